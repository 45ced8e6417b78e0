"""Per-layer Python overhead on a small net: a 12x12 MTCNN P-Net stage forward, side by side in one run.

    python benchmarks/bench_small_nets.py [--threads 1] [--rounds 7] [--calls 2000] [--aoti] [--conv-sizes]
                                          [deploy.prototxt ...]

Rows (microseconds per forward, best of `rounds` rounds of `calls` calls, process CPU time, under
torch.inference_mode): the same ops written by hand as a plain torch function (the eager floor), TorchNet
(the default: its small layers chained into one native call, engine/tiny.py), TorchNet without the chains
(each lowered layer a torch call, as before them), TorchNet(lower=False) (one module call a layer), the pycaffe
Net called with tensors and with numpy blobs (Net.forward), AOTInductor of the exported TorchNet (--aoti:
about a minute to build), and OpenCV dnn's Caffe importer on the same weights. The ratio is each row over
OpenCV. Prototxts given after the options are timed too (TorchNet lowered and not, and OpenCV) so that
bigger nets can be checked for regressions. --conv-sizes times one convolution with its PReLU, as a chain's
native program (engine/tiny.py) and as torch's calls, across sizes: where the ratio passes 1 is the
native.DIRECT_CONV_MAX_WORK threshold. Times are noisy on a shared machine: read the ratios.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench_layers import mtcnn_onet, mtcnn_pnet, mtcnn_rnet
from caffe_layers import Net, TorchNet, native
from caffe_layers.engine import graph, tiny


def best_us(fn, rounds, calls):
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - start) / calls * 1e6)
    return min(times)


def pnet_by_hand(params):
    """The P-Net of bench_layers.mtcnn_pnet written as plain torch calls on the net's own parameters."""
    p = {k: v.detach() for k, v in params.items()}

    def forward(x):
        y = F.prelu(F.conv2d(x, p["conv1.0"], p["conv1.1"]), p["prelu1.0"])
        y = F.max_pool2d(y, 2, 2, 0, 1, True)
        y = F.prelu(F.conv2d(y, p["conv2.0"], p["conv2.1"]), p["prelu2.0"])
        y = F.prelu(F.conv2d(y, p["conv3.0"], p["conv3.1"]), p["prelu3.0"])
        return {"conv4_2": F.conv2d(y, p["conv4_2.0"], p["conv4_2.1"]),
                "prob1": torch.softmax(F.conv2d(y, p["conv4_1.0"], p["conv4_1.1"]), 1)}
    return forward


def opencv_forward(prototxt, weights, x, threads):
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    blob = x.numpy()

    def forward():
        net.setInput(blob, "data")
        return net.forward()
    return forward


def aoti_forward(net, x, tmp):
    with torch.no_grad():
        program = torch.export.export(net, (), {"data": x})
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "net.pt2"))
    run = torch._inductor.aoti_load_package(package)
    return lambda: run(data=x)


def unchained(*args, **kwargs):
    """A TorchNet built without engine/tiny.py's chains (its lowered layers one torch call each)."""
    chain, graph.chain_tiny_layers = graph.chain_tiny_layers, lambda steps, shapes, needed: steps
    try:
        return TorchNet(*args, **kwargs)
    finally:
        graph.chain_tiny_layers = chain


def check_same(rows_out, want):
    for name, value in rows_out.items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5)


def pnet_rows(args, tmp):
    prototxt, shape = mtcnn_pnet(tmp)
    lowered = TorchNet(str(prototxt))
    weights = Path(tmp) / "pnet.caffemodel"
    lowered.save(str(weights))
    modules = TorchNet(str(prototxt), str(weights), lower=False)
    plain = unchained(str(prototxt), str(weights))
    pycaffe = Net(str(prototxt), str(weights))
    x = torch.randn(shape)
    by_hand = pnet_by_hand(dict(lowered.state_dict()))
    rows = []
    with torch.inference_mode():
        want = lowered(data=x)
        check_same(by_hand(x), want)
        check_same(modules(data=x), want)
        check_same(plain(data=x), want)
        check_same(pycaffe(data=x), want)
        rows.append(("plain torch function (floor)", best_us(lambda: by_hand(x), args.rounds, args.calls)))
        rows.append(("TorchNet (chained, the default)", best_us(lambda: lowered(data=x), args.rounds, args.calls)))
        rows.append(("TorchNet without chains (lowered)", best_us(lambda: plain(data=x), args.rounds, args.calls)))
        rows.append(("TorchNet(lower=False)", best_us(lambda: modules(data=x), args.rounds, args.calls)))
        rows.append(("Net(data=tensor)", best_us(lambda: pycaffe(data=x), args.rounds, args.calls)))
    blob = x.numpy()
    rows.append(("Net.forward(data=numpy)", best_us(lambda: pycaffe.forward(data=blob), args.rounds, args.calls)))
    if args.aoti:
        run = aoti_forward(lowered, x, tmp)
        with torch.inference_mode():
            check_same(run(), want)
            rows.append(("AOTInductor (exported TorchNet)", best_us(run, args.rounds, args.calls)))
    run = opencv_forward(prototxt, weights, x, args.threads)
    if run is not None:
        np.testing.assert_allclose(run(), want["prob1"].numpy(), rtol=1e-4, atol=1e-5)
        rows.append(("OpenCV dnn", best_us(run, args.rounds, args.calls)))
    return rows


def prototxt_rows(path, args, tmp):
    lowered = TorchNet(str(path))
    weights = Path(tmp) / "net.caffemodel"
    lowered.save(str(weights))
    modules = TorchNet(str(path), str(weights), lower=False)
    plain = unchained(str(path), str(weights))
    inputs = {name: torch.randn(lowered.blob_shapes[name]) for name in lowered.inputs}
    rows = []
    with torch.inference_mode():
        start = time.process_time()
        check_same(modules(**inputs), lowered(**inputs))
        # about 0.05 s of calls a round
        rounds, calls = args.rounds, max(1, min(args.calls, int(0.1 / max(time.process_time() - start, 1e-6))))
        check_same(plain(**inputs), lowered(**inputs))
        rows.append((f"{path}: TorchNet (chained, the default)", best_us(lambda: lowered(**inputs), rounds, calls)))
        rows.append((f"{path}: TorchNet without chains", best_us(lambda: plain(**inputs), rounds, calls)))
        rows.append((f"{path}: TorchNet(lower=False)", best_us(lambda: modules(**inputs), rounds, calls)))
    if len(inputs) == 1:
        run = opencv_forward(path, weights, next(iter(inputs.values())), args.threads)
        if run is not None:
            rows.append((f"{path}: OpenCV dnn", best_us(run, rounds, calls)))
    return rows


# (channels, size, outputs, kernel): MTCNN's layers (P-Net on a few pyramid levels, R-Net, O-Net) and others
CONV_SIZES = [(3, 12, 10, 3), (10, 5, 16, 3), (16, 3, 32, 3), (32, 1, 4, 1), (3, 16, 10, 3), (3, 20, 10, 3),
              (3, 24, 28, 3), (3, 32, 10, 3), (28, 11, 48, 3), (10, 12, 16, 3), (3, 48, 32, 3), (32, 23, 64, 3),
              (64, 10, 64, 3), (64, 4, 128, 2), (16, 24, 32, 3), (3, 64, 10, 3)]


def conv_size_rows(args):
    """One convolution + PReLU: the chain's native program against F.conv2d + F.prelu, by multiply-adds."""
    rows = []
    for channels, size, outputs, kernel in CONV_SIZES:
        x = torch.randn(1, channels, size, size)
        w, b, slope = torch.randn(outputs, channels, kernel, kernel), torch.randn(outputs), torch.rand(outputs)
        spec = ((("conv", 0, 0, 1, (1, 1), (0, 0), (1, 1), 1, (kernel, kernel, 0, 0, 1, 1, 1, 1), "prelu", 2),), (1,))
        work = outputs * (size - kernel + 1) ** 2 * channels * kernel * kernel
        limit, native.DIRECT_CONV_MAX_WORK = native.DIRECT_CONV_MAX_WORK, 1 << 40
        try:
            with torch.inference_mode():
                torch.testing.assert_close(tiny.run_chain(spec, x, w, b, slope)[0], F.prelu(F.conv2d(x, w, b), slope),
                                           rtol=1e-4, atol=1e-4)
                calls = max(10, args.calls // max(1, work // 20000))
                ours = best_us(lambda: tiny.run_chain(spec, x, w, b, slope), args.rounds, calls)
                theirs = best_us(lambda: F.prelu(F.conv2d(x, w, b), slope), args.rounds, calls)
        finally:
            native.DIRECT_CONV_MAX_WORK = limit
        rows.append((work, f"conv {channels}->{outputs} k{kernel} on {size}x{size}", ours, theirs))
    print(f"{'convolution + PReLU':34s} {'mult-adds':>10s} {'native us':>10s} {'torch us':>10s} {'ratio':>7s}")
    for work, name, ours, theirs in sorted(rows):
        print(f"{name:34s} {work:10d} {ours:10.1f} {theirs:10.1f} {ours / theirs:7.2f}")
    print(f"(native.DIRECT_CONV_MAX_WORK = {native.DIRECT_CONV_MAX_WORK})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--aoti", action="store_true", help="also time AOTInductor (about a minute to build)")
    ap.add_argument("--mtcnn", action="store_true",
                    help="also time MTCNN's R-Net and O-Net stages, one image and a batch of 16, and P-Net on 24x24")
    ap.add_argument("--conv-sizes", action="store_true",
                    help="also time single convolutions natively and by torch across sizes (the chain threshold)")
    ap.add_argument("prototxts", nargs="*", help="more deploy prototxts to time (lowered and not)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); us per forward, best of {args.rounds} rounds "
          f"(process CPU time); ratio = row / OpenCV (the last row of a group)")
    with tempfile.TemporaryDirectory() as tmp:
        groups = [pnet_rows(args, tmp)] + [prototxt_rows(p, args, tmp) for p in args.prototxts]
        if args.mtcnn:
            stages = [mtcnn_rnet(tmp), mtcnn_onet(tmp), mtcnn_rnet(tmp, 16), mtcnn_onet(tmp, 16)]
            pnet24 = Path(tmp) / "pnet24.prototxt"
            pnet24.write_text(mtcnn_pnet(tmp)[0].read_text().replace("dim: 12", "dim: 24"))
            groups += [prototxt_rows(path, args, tmp) for path, _ in stages] + [prototxt_rows(pnet24, args, tmp)]
    for rows in groups:
        reference = rows[-1][1] if rows[-1][0].endswith("OpenCV dnn") else None
        for name, us in rows:
            ratio = f"{us / reference:7.2f}" if reference else ""
            print(f"{name:60s} {us:12.1f} {ratio}", flush=True)
        print()
    if args.conv_sizes:
        conv_size_rows(args)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
