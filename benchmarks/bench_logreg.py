"""BVLC's brewing-logreg solve (examples/brewing-logreg.ipynb: HDF5Data -> InnerProduct -> SoftmaxWithLoss +
Accuracy, batch 10, 10,000 SGD iterations and 11 tests of 250 batches; bench_nets.logreg_solver) and its
per-iteration figures, the explicit Caffe-style passes (engine/explicit.py) against the autograd path
measured in the same run, one thread, process CPU time, best of --runs fresh processes.

    python benchmarks/bench_logreg.py [--runs 3] [--against /path/to/other/checkout]

--against times the same solve with another checkout's caffe_layers (PYTHONPATH), alternating with this one.
The original Caffe takes ~0.2 s for the solve on this machine kind (issue 15's figure).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAFFE_SOLVE_S = 0.2


def child(path_kind):
    import caffe_layers  # noqa: F401  (first: OMP_WAIT_POLICY)
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_nets
    from caffe_layers import pycaffe as caffe

    if path_kind == "autograd":
        from caffe_layers.engine import explicit
        explicit.supports = lambda net: False
    with tempfile.TemporaryDirectory() as tmp:
        path = bench_nets.logreg_solver(tmp)
        wall, cpu = time.perf_counter(), time.process_time()
        solver = caffe.get_solver(str(path))
        solver.solve()
        result = {"solve": time.perf_counter() - wall, "solve_cpu": time.process_time() - cpu}
        inner = solver._solver  # per-iteration figures: no tests, displays or snapshots inside the timing
        inner.param.test_interval, inner.param.display, inner.param.snapshot = 0, 0, 0
        best = float("inf")
        for _ in range(5):
            cpu = time.process_time()
            solver.step(500)
            best = min(best, (time.process_time() - cpu) / 500)
        result["iteration_cpu"] = best
        best = float("inf")
        for _ in range(3):
            cpu = time.process_time()
            inner.test(0)
            best = min(best, (time.process_time() - cpu) / inner.param.test_iter[0])
        result["test_forward_cpu"] = best
    print(json.dumps(result))


def measure(checkout, path_kind):
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOG_minloglevel="1")
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    done = subprocess.run([sys.executable, __file__, "--child", path_kind], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{checkout or ROOT} ({path_kind}): {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", help="another checkout to time the same solve with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    kinds = [("explicit", None, "explicit"), ("autograd", None, "autograd")]
    if args.against:
        kinds.append((f"{args.against}", args.against, "explicit"))
    best = {}
    for _ in range(args.runs):
        for label, checkout, path_kind in kinds:
            r = measure(checkout, path_kind)
            best[label] = {k: min(v, best.get(label, {}).get(k, v)) for k, v in r.items()}
    print(f"brewing-logreg, 1 thread, best of {args.runs} fresh processes (process CPU time; wall in brackets)")
    for label, r in best.items():
        print(f"{label:>12}: solve {r['solve_cpu']:.2f} s [{r['solve']:.2f} s wall] = "
              f"{r['solve_cpu'] / CAFFE_SOLVE_S:.1f}x Caffe's ~0.2 s; train iteration {r['iteration_cpu'] * 1e6:.0f} us, "
              f"test forward {r['test_forward_cpu'] * 1e6:.0f} us")
    base = best["autograd"]["solve_cpu"]
    print(f"explicit passes / autograd path: {best['explicit']['solve_cpu'] / base:.2f}x the solve's CPU time")


if __name__ == "__main__":
    main()
