"""Forward of a small net on a loaded machine: 1 thread, 2 threads and torch's default, side by side.

    python benchmarks/bench_threads.py [--busy N] [--repeat R]

Starts N busy processes (default 1: one core taken by someone else), then times the forward of the
segaware embs deploy net (97 x 97) and of an MTCNN P-Net-sized net, alternating the thread settings
so that all see the same load. Prints best and median milliseconds; the median is what a user waits.
This is what caffe_layers' default thread count (CAFFE_LAYERS_NUM_THREADS, README) is chosen from.
"""
import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import mtcnn_pnet  # noqa: E402

from caffe_layers import Net  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def busy(stop):
    while not stop.is_set():
        sum(i * i for i in range(10000))


def embs_net(tmp):
    """The segaware embs deploy net at 97 x 97, as the golden set has it (../shared/golden/nets)."""
    with np.load(ROOT.parent / "shared/golden/nets/embs_deploy_97.npz") as case:
        text = str(case["prototxt"])
        inputs = {k[3:]: torch.as_tensor(case[k]) for k in case.files if k.startswith("in:")}
    path = Path(tmp) / "embs.prototxt"
    path.write_text(text)
    return Net(str(path), phase="test"), inputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=1, help="busy processes to start (0: none)")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    default = torch.get_num_threads()
    settings = {"1 thread": 1, "2 threads": 2, f"torch default ({default})": default}
    with tempfile.TemporaryDirectory() as tmp:
        pnet_path, pnet_shape = mtcnn_pnet(tmp)
        nets = {"embs deploy 97": embs_net(tmp),
                "MTCNN P-Net 12x12": (Net(str(pnet_path), phase="test"), {"data": torch.randn(pnet_shape)})}
        stop = multiprocessing.Event()
        hogs = [multiprocessing.Process(target=busy, args=(stop,), daemon=True) for _ in range(args.busy)]
        for hog in hogs:
            hog.start()
        try:
            print(f"{args.busy} busy process(es) on {multiprocessing.cpu_count()} cores; ms per forward (best, median)")
            for name, (net, inputs) in nets.items():
                times = {s: [] for s in settings}
                with torch.no_grad():
                    for s, n in settings.items():  # warm up every setting
                        torch.set_num_threads(n)
                        net(**inputs)
                    for _ in range(args.repeat):
                        for s, n in settings.items():
                            torch.set_num_threads(n)
                            start = time.perf_counter()
                            net(**inputs)
                            times[s].append(time.perf_counter() - start)
                row = "  ".join(f"{s}: {min(t) * 1e3:8.2f} {statistics.median(t) * 1e3:8.2f}" for s, t in times.items())
                print(f"{name:22s} {row}")
        finally:
            stop.set()
            for hog in hogs:
                hog.join()
            torch.set_num_threads(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
