"""Per-layer Python overhead on a small net: a 12x12 MTCNN P-Net stage forward, side by side in one run.

    python benchmarks/bench_small_nets.py [--threads 1] [--rounds 7] [--calls 2000] [--aoti] [deploy.prototxt ...]

Rows (microseconds per forward, best of `rounds` rounds of `calls` calls, process CPU time, under
torch.inference_mode): the same ops written by hand as a plain torch function (the eager floor), TorchNet
(layers lowered to torch calls, the default), TorchNet(lower=False) (one module call a layer), the pycaffe
Net called with tensors and with numpy blobs (Net.forward), AOTInductor of the exported TorchNet (--aoti:
about a minute to build), and OpenCV dnn's Caffe importer on the same weights. The ratio is each row over
OpenCV. Prototxts given after the options are timed too (TorchNet lowered and not, and OpenCV) so that
bigger nets can be checked for regressions. Times are noisy on a shared machine: read the ratios.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench_layers import mtcnn_pnet
from caffe_layers import Net, TorchNet


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


def check_same(rows_out, want):
    for name, value in rows_out.items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5)


def pnet_rows(args, tmp):
    prototxt, shape = mtcnn_pnet(tmp)
    lowered = TorchNet(str(prototxt))
    weights = Path(tmp) / "pnet.caffemodel"
    lowered.save(str(weights))
    modules = TorchNet(str(prototxt), str(weights), lower=False)
    pycaffe = Net(str(prototxt), str(weights))
    x = torch.randn(shape)
    by_hand = pnet_by_hand(dict(lowered.state_dict()))
    rows = []
    with torch.inference_mode():
        want = lowered(data=x)
        check_same(by_hand(x), want)
        check_same(modules(data=x), want)
        check_same(pycaffe(data=x), want)
        rows.append(("plain torch function (floor)", best_us(lambda: by_hand(x), args.rounds, args.calls)))
        rows.append(("TorchNet (lowered)", best_us(lambda: lowered(data=x), args.rounds, args.calls)))
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
    inputs = {name: torch.randn(lowered.blob_shapes[name]) for name in lowered.inputs}
    rounds, calls = args.rounds, max(1, args.calls // 500)
    rows = []
    with torch.inference_mode():
        check_same(modules(**inputs), lowered(**inputs))
        rows.append((f"{path}: TorchNet (lowered)", best_us(lambda: lowered(**inputs), rounds, calls)))
        rows.append((f"{path}: TorchNet(lower=False)", best_us(lambda: modules(**inputs), rounds, calls)))
    if len(inputs) == 1:
        run = opencv_forward(path, weights, next(iter(inputs.values())), args.threads)
        if run is not None:
            rows.append((f"{path}: OpenCV dnn", best_us(run, rounds, calls)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--aoti", action="store_true", help="also time AOTInductor (about a minute to build)")
    ap.add_argument("prototxts", nargs="*", help="more deploy prototxts to time (lowered and not)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); us per forward, best of {args.rounds} rounds "
          f"(process CPU time); ratio = row / OpenCV (the last row of a group)")
    with tempfile.TemporaryDirectory() as tmp:
        groups = [pnet_rows(args, tmp)] + [prototxt_rows(p, args, tmp) for p in args.prototxts]
    for rows in groups:
        reference = rows[-1][1] if rows[-1][0].endswith("OpenCV dnn") else None
        for name, us in rows:
            ratio = f"{us / reference:7.2f}" if reference else ""
            print(f"{name:60s} {us:12.1f} {ratio}", flush=True)
        print()
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
