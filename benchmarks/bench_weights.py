"""Load time and peak memory of a ResNet-101-sized .caffemodel (about 170 MB).

  python benchmarks/bench_weights.py [--dir DIR]

Generates a net with ResNet-101's convolution / BatchNorm-sized parameter blobs (convolutions fed
by 1x1 Input blobs of the right channel counts, so only Input and Convolution layers are needed),
writes it as a .caffemodel, then times (a) read_caffemodel (numpy arrays, no net) and
(b) load_weights into the built net. Peak memory is the peak resident set size during the call
minus the resident size before it, sampled every millisecond from /proc/self/statm.
"""
import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from caffe_layers import Net  # noqa: E402
from caffe_layers.formats.weights import load_weights, read_caffemodel, write_caffemodel  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_during(fn):
    """(result, seconds, peak RSS increase in bytes) of fn()."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return result, elapsed, max(peak[0], rss()) - base


def resnet101_convs():
    """(name, in channels, out channels, kernel, bias) of ResNet-101's convolutions + the fc."""
    convs = [("conv1", 3, 64, 7, False)]
    cin = 64
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (23, 256), (3, 512)], start=2):
        for b in range(blocks):
            name = f"res{stage}_{b}"
            if b == 0:
                convs.append((f"{name}_branch1", cin, width * 4, 1, False))
            convs += [(f"{name}_branch2a", cin, width, 1, False),
                      (f"{name}_branch2b", width, width, 3, False),
                      (f"{name}_branch2c", width, width * 4, 1, False)]
            cin = width * 4
    convs.append(("fc1000", 2048, 1000, 1, True))
    return convs


def net_text():
    convs = resnet101_convs()
    channels = sorted({c[1] for c in convs} | {c[2] for c in convs})
    shapes = " ".join(f"shape {{ dim: 1 dim: {c} dim: 1 dim: 1 }}" for c in channels)
    tops = " ".join(f'top: "c{c}"' for c in channels)
    lines = ['name: "resnet101_sized"',
             f'layer {{ name: "input" type: "Input" {tops} input_param {{ {shapes} }} }}']
    for name, cin, cout, k, bias in convs:
        lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "c{cin}" top: "{name}" '
                     f'convolution_param {{ num_output: {cout} kernel_size: {k} pad: {k // 2} '
                     f'bias_term: {"true" if bias else "false"} }} }}')
        # the BatchNorm + Scale parameters of that convolution: 4 x cout values
        if not bias:
            lines.append(f'layer {{ name: "bn_{name}" type: "Convolution" bottom: "c{cout}" top: "bn_{name}" '
                         f'convolution_param {{ num_output: 4 kernel_size: 1 bias_term: false }} }}')
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        net = Net(net_text())
        rng = np.random.default_rng(0)
        weights = {name: [rng.standard_normal(p.shape, dtype=np.float32) for p in layer.blobs]
                   for name, layer in net.layer_dict.items() if len(layer.blobs)}
        path = os.path.join(tmp, "resnet101_sized.caffemodel")
        write_caffemodel(path, weights, "resnet101_sized")
        del weights
        size = os.path.getsize(path)
        count = sum(p.numel() for p in net.parameters())
        print(f"file: {size / 1e6:.1f} MB, {count / 1e6:.1f} M parameters, "
              f"{len(net.layer_dict) - 1} layers with weights; {os.cpu_count()} CPUs")
        with open(path, "rb") as f:  # warm the page cache, as a second load would find it
            while f.read(1 << 24):
                pass
        for label, fn in [("read_caffemodel (numpy, no net)", lambda: read_caffemodel(path)),
                          ("load_weights into the built net", lambda: load_weights(net, path))]:
            result, seconds, peak = peak_during(fn)
            print(f"{label:34s}: {seconds:6.3f} s, peak memory +{peak / 1e6:7.1f} MB "
                  f"({peak / size:.2f}x the file)")
            del result
        report = load_weights(net, path, strict=True)
        print(f"strict load: {len(report.copied)} layers copied, complete={report.complete}")


if __name__ == "__main__":
    main()
