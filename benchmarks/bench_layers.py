"""Per-layer forward times of the standard layers: ours against OpenCV dnn's Caffe importer (the same
one-layer net, built with NetSpec, same weights, same threads), measured side by side in one run.

    python benchmarks/bench_layers.py [--threads N] [--repeat R] [--only Pooling,LRN]

Prints best and median milliseconds and the ratio OpenCV / ours (above 1: ours is faster), the layer-level
Python overhead (a 12x12 MTCNN P-Net-sized stack: conv, PReLU, pool, softmax, end to end), and the
layers alone against this project's previous implementation of them (checked equal first).
Times are noisy on a shared machine: read the ratios, best of several runs.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caffe_layers import Net, NetSpec, layers as L, params as P

FILLER = dict(type="gaussian", std=0.1)

# name -> (input shape, builder of the one layer from the input top)
CASES = {
    "Convolution 3x3 64->64": ((1, 64, 112, 112), lambda x: L.Convolution(
        x, kernel_size=3, pad=1, num_output=64, weight_filler=FILLER, bias_filler=FILLER)),
    "Pooling MAX 3x3 s2 ceil": ((1, 64, 112, 112), lambda x: L.Pooling(x, kernel_size=3, stride=2, pool=P.Pooling.MAX)),
    "Pooling MAX 2x2 s2": ((1, 64, 112, 112), lambda x: L.Pooling(x, kernel_size=2, stride=2, pool=P.Pooling.MAX)),
    "Pooling AVE 3x3 s1 p1": ((1, 64, 56, 56), lambda x: L.Pooling(x, kernel_size=3, stride=1, pad=1, pool=P.Pooling.AVE)),
    "Pooling AVE global": ((10, 1024, 7, 7), lambda x: L.Pooling(x, global_pooling=True, pool=P.Pooling.AVE)),
    "LRN across 5": ((1, 96, 55, 55), lambda x: L.LRN(x, local_size=5, alpha=1e-4, beta=0.75)),
    "LRN within 3": ((1, 32, 55, 55), lambda x: L.LRN(x, local_size=3, alpha=1e-4, beta=0.75,
                                                       norm_region=P.LRN.WITHIN_CHANNEL)),
    "ReLU": ((1, 64, 112, 112), lambda x: L.ReLU(x)),
    "Softmax": ((1, 21, 161, 161), lambda x: L.Softmax(x)),
    "InnerProduct 4096->1000": ((10, 4096), lambda x: L.InnerProduct(
        x, num_output=1000, weight_filler=FILLER, bias_filler=FILLER)),
    "Eltwise SUM x2": ((1, 256, 56, 56), lambda x: L.Eltwise(x, x)),
    "Concat x2": ((1, 128, 56, 56), lambda x: L.Concat(x, x)),
    "Slice 2": ((1, 128, 56, 56), lambda x: L.Slice(x, slice_point=64, ntop=2)),
    "Crop": ((1, 64, 120, 120), lambda x: L.Crop(x, L.DummyData(shape=dict(dim=[1, 64, 100, 100])), axis=2,
                                                 offset=3)),
    "Interp zoom 8 (21 ch)": ((1, 21, 41, 41), lambda x: L.Interp(x, zoom_factor=8)),
    "Deconvolution x2 (21 ch)": ((1, 21, 41, 41), lambda x: L.Deconvolution(x, convolution_param=dict(
        num_output=21, group=21, kernel_size=4, stride=2, pad=1, bias_term=False, weight_filler=dict(type="bilinear")))),
}
OPENCV_LACKS = {"Interp zoom 8 (21 ch)"}  # DeepLab's Interp is not an OpenCV layer


def one_layer_net(shape, build, tmp):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    tops = build(n.data)
    for i, top in enumerate(tops if isinstance(tops, tuple) else (tops,)):
        setattr(n, f"out{i}", top)
    proto = n.to_proto()
    path = Path(tmp) / "net.prototxt"
    path.write_text(str(proto))
    return path


def timed(fn, repeat):
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


def opencv_runner(prototxt, weights, x, threads):
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights)) if weights else cv2.dnn.readNetFromCaffe(str(prototxt))
    blob = x.numpy()

    def run():
        net.setInput(blob, "data")
        return net.forward()
    return run


def previous_implementations():
    """name -> (input shape, layer text, the previous implementation of its forward), to time beside ours."""
    import torch.nn.functional as F

    from caffe_layers.layers.interp import interp_matrix

    def windowed(layer):  # Pooling before torch's kernels: its windowed path, still the fallback
        def run(x):
            kernel, out = layer.out_size(x.shape)
            return layer._max(x, kernel, out) if layer.method == P.Pooling.MAX else layer._ave(x, kernel, out)
        return run

    def lrn_across(layer):  # a padded copy, then a window sum over an unfolded view
        def run(x):
            pre = (layer.size - 1) // 2
            window = F.pad(x * x, (0, 0, 0, 0, pre, pre)).unfold(1, layer.size, 1).sum(-1)
            return x * (layer.k + layer.alpha / layer.size * window) ** -layer.beta
        return run

    def interp(layer):  # the matrices built at every call, one einsum
        def run(x):
            eff, out = layer.sizes(x.shape)
            mh = interp_matrix(x.shape[2], 0, eff[0], out[0]).to(x.dtype)
            mw = interp_matrix(x.shape[3], 0, eff[1], out[1]).to(x.dtype)
            return torch.einsum("ih,nchw,jw->ncij", mh, x, mw)
        return run

    return {
        "Pooling MAX 3x3 s2 ceil": ((1, 64, 112, 112), "pooling_param { pool: MAX kernel_size: 3 stride: 2 }",
                                    "Pooling", windowed),
        "Pooling AVE 3x3 s1 p1": ((1, 64, 56, 56), "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }",
                                  "Pooling", windowed),
        "LRN across 5": ((1, 96, 55, 55), "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }", "LRN", lrn_across),
        "Interp zoom 8 (21 ch)": ((1, 21, 41, 41), "interp_param { zoom_factor: 8 }", "Interp", interp),
    }


def against_previous(repeat):
    from google.protobuf import text_format

    from caffe_layers.formats.proto import pb
    from caffe_layers.layers import layer_class

    rows = []
    for name, (shape, text, kind, previous) in previous_implementations().items():
        lp = text_format.Parse(f'name: "L" type: "{kind}" top: "t" {text}', pb.LayerParameter())
        layer = layer_class(kind)(lp, [shape], pb.TEST)
        x = torch.randn(shape)
        old = previous(layer)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), old(x), rtol=1e-5, atol=1e-6)
            ours, before = timed(lambda: layer(x), repeat), timed(lambda: old(x), repeat)
        rows.append(f"{name:28s} {ours[0]:9.3f} {ours[1]:9.3f} {before[0]:9.3f} {before[1]:9.3f} "
                    f"{before[0] / ours[0]:7.2f}")
    return rows


def mtcnn_pnet(tmp):
    """MTCNN P-Net's layers on a 12x12 input: the per-layer overhead dominates."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 12]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=10, weight_filler=FILLER)
    n.prelu1 = L.PReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.prelu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=3, num_output=16, weight_filler=FILLER)
    n.prelu2 = L.PReLU(n.conv2, in_place=True)
    n.conv3 = L.Convolution(n.prelu2, kernel_size=3, num_output=32, weight_filler=FILLER)
    n.prelu3 = L.PReLU(n.conv3, in_place=True)
    n.conv4_1 = L.Convolution(n.prelu3, kernel_size=1, num_output=2, weight_filler=FILLER)
    n.conv4_2 = L.Convolution(n.prelu3, kernel_size=1, num_output=4, weight_filler=FILLER)
    n.prob1 = L.Softmax(n.conv4_1)
    path = Path(tmp) / "pnet.prototxt"
    path.write_text(str(n.to_proto()))
    return path, (1, 3, 12, 12)


def _conv_prelu(x, outputs, kernel):
    conv = L.Convolution(x, kernel_size=kernel, num_output=outputs, weight_filler=FILLER, bias_filler=FILLER)
    return conv, L.PReLU(conv, in_place=True)


def _ip_prelu(x, outputs):
    ip = L.InnerProduct(x, num_output=outputs, weight_filler=FILLER, bias_filler=FILLER)
    return ip, L.PReLU(ip, in_place=True)


def mtcnn_rnet(tmp, batch=1):
    """MTCNN R-Net's layers on 24x24 inputs."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, 24, 24]))
    n.conv1, n.prelu1 = _conv_prelu(n.data, 28, 3)
    n.pool1 = L.Pooling(n.prelu1, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    n.conv2, n.prelu2 = _conv_prelu(n.pool1, 48, 3)
    n.pool2 = L.Pooling(n.prelu2, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    n.conv3, n.prelu3 = _conv_prelu(n.pool2, 64, 2)
    n.conv4, n.prelu4 = _ip_prelu(n.prelu3, 128)
    n.conv5_1 = L.InnerProduct(n.prelu4, num_output=2, weight_filler=FILLER)
    n.conv5_2 = L.InnerProduct(n.prelu4, num_output=4, weight_filler=FILLER)
    n.prob1 = L.Softmax(n.conv5_1)
    path = Path(tmp) / f"rnet{batch}.prototxt"
    path.write_text(str(n.to_proto()))
    return path, (batch, 3, 24, 24)


def mtcnn_onet(tmp, batch=1):
    """MTCNN O-Net's layers on 48x48 inputs."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, 48, 48]))
    n.conv1, n.prelu1 = _conv_prelu(n.data, 32, 3)
    n.pool1 = L.Pooling(n.prelu1, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    n.conv2, n.prelu2 = _conv_prelu(n.pool1, 64, 3)
    n.pool2 = L.Pooling(n.prelu2, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    n.conv3, n.prelu3 = _conv_prelu(n.pool2, 64, 3)
    n.pool3 = L.Pooling(n.prelu3, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv4, n.prelu4 = _conv_prelu(n.pool3, 128, 2)
    n.conv5, n.prelu5 = _ip_prelu(n.prelu4, 256)
    n.conv6_1 = L.InnerProduct(n.prelu5, num_output=2, weight_filler=FILLER)
    n.conv6_2 = L.InnerProduct(n.prelu5, num_output=4, weight_filler=FILLER)
    n.conv6_3 = L.InnerProduct(n.prelu5, num_output=10, weight_filler=FILLER)
    n.prob1 = L.Softmax(n.conv6_1)
    path = Path(tmp) / f"onet{batch}.prototxt"
    path.write_text(str(n.to_proto()))
    return path, (batch, 3, 48, 48)


def compare(name, prototxt, shape, threads, repeat, tmp):
    net = Net(str(prototxt), phase="test")
    weights = None
    if any(len(layer.blobs) for layer in net.layer_modules):
        weights = Path(tmp) / "net.caffemodel"
        net.save(str(weights))
    x = torch.randn(shape)
    with torch.no_grad():
        ours = timed(lambda: net(data=x), repeat)
    row = f"{name:28s} {ours[0]:9.3f} {ours[1]:9.3f}"
    run_cv = None if name in OPENCV_LACKS else opencv_runner(prototxt, weights, x, threads)
    if run_cv is None:
        return row + f"{'-':>10s} {'-':>9s} {'-':>7s}"
    try:
        cv = timed(run_cv, repeat)
    except Exception as err:  # cv2.error: OpenCV's importer rejects the layer
        return row + f"  opencv fails: {str(err).splitlines()[-1][:60]}"
    return row + f" {cv[0]:9.3f} {cv[1]:9.3f} {cv[0] / ours[0]:7.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per forward (best, median); "
          f"ratio = OpenCV best / ours best")
    print(f"{'layer':28s} {'ours':>9s} {'(med)':>9s} {'opencv':>9s} {'(med)':>9s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, build) in CASES.items():
            if args.only and not any(s in name for s in args.only.split(",")):
                continue
            print(compare(name, one_layer_net(shape, build, tmp), shape, args.threads, args.repeat, tmp), flush=True)
        path, shape = mtcnn_pnet(tmp)
        print(compare("MTCNN P-Net 12x12 (10 layers)", path, shape, args.threads, args.repeat * 10, tmp))
    print(f"\n{'layer alone':28s} {'ours':>9s} {'(med)':>9s} {'previous':>9s} {'(med)':>9s} {'ratio':>7s}")
    for row in against_previous(args.repeat):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    torch.manual_seed(0)
    sys.exit(main())
