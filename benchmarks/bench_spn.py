"""Time the spatial propagation scan on a 64x64 map with 32 channels (the paper's hidden layer).

    python benchmarks/bench_spn.py [--batch 1] [--repeat 20]

Prints forward and forward+backward milliseconds per direction for the scan
(caffe_layers.native.gate_recurrent: the native kernels where built) on the CPU, and on CUDA when torch sees a GPU.
The paper reports 1.3 ms for this layer on a 2017 GPU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caffe_layers.native import gate_recurrent  # noqa: E402
from caffe_layers.ops.spn import DIRECTIONS  # noqa: E402


def timed(fn, device, repeat):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def bench(device, batch, repeat):
    shape = (batch, 32, 64, 64)
    x = torch.randn(shape, device=device, requires_grad=True)
    gates = [(torch.rand(shape, device=device) / 3).requires_grad_(True) for _ in range(3)]
    for (horizontal, reverse), name in DIRECTIONS.items():
        def fwd():
            with torch.no_grad():
                gate_recurrent(x, *gates, horizontal, reverse)

        def fwd_bwd():
            gate_recurrent(x, *gates, horizontal, reverse).sum().backward()

        print(f"{device.type:5s} {name:12s} {list(shape)}  forward {timed(fwd, device, repeat):8.2f} ms"
              f"   forward+backward {timed(fwd_bwd, device, repeat):8.2f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench(torch.device("cpu"), args.batch, args.repeat)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name())
        bench(torch.device("cuda"), args.batch, args.repeat)
    else:
        print("no CUDA device: GPU timings skipped")


if __name__ == "__main__":
    main()
