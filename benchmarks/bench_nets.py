"""Whole nets: build time, forward time (best and median) and peak resident memory, ours against OpenCV dnn (same
weights, same threads, measured in this run) and against the original Caffe's figures on this machine kind
(../shared/baselines/original_caffe_cpu.md, measured another day: read those ratios as approximate).

    python benchmarks/bench_nets.py                       # vgg321 res129 embs321 (add res513: --nets all)
    python benchmarks/bench_nets.py --nets none path/to/bvlc_googlenet/deploy.prototxt [more.prototxt ...]
    python benchmarks/bench_nets.py --train               # LeNet, brewing-logreg, embs and vgg training (--help)
    python benchmarks/bench_nets.py --compile [--nets ...] [--size 161] [deploy.prototxt ...]   # against torch.compile

Each figure comes from a fresh process, so that its peak memory is its own. "ours" is the torch face
(TorchNet) under torch.inference_mode; "pycaffe" is caffe_layers.Net.forward (Caffe's persistent blobs).
--compile times, in one process for each net, the eager TorchNet and torch.compile(net, fullgraph=True)
(inductor) on the same inputs, both under inference_mode with the native kernels on (the compiled graph calls
them as custom ops). Each net's inductor cache is a directory of its own (under --cache-dir, kept, else a
temporary one): the first process compiles cold where that directory is empty, then a second fresh process
compiles the same net again over it (warm: dynamo's capture again, inductor's FX graph cache and autotuning
results reused), so both compile times are reported, with the cache hits each process saw. --size N runs the
segaware nets (vgg, embs, res) at N x N instead of their own sizes: the compile time hardly depends on it, the
eager and compiled forwards do. The environment passes to the children: TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 keeps
inductor's convolution buffers in NCHW (its channels-last choice slows the Interp matmuls of the segaware nets).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "segaware"
BASELINES = ROOT.parent / "shared" / "baselines" / "original_caffe_cpu.md"
RES_129 = {"513": "129", "385": "97", "257": "65", "65": "17"}  # (d - 1) * 128 / 512 + 1, as the baselines
NETS = {  # name: (reference config, size substitutions for dim/height/width lines)
    "vgg321": ("vgg/deploy.prototxt", {}),
    "res129": ("res/deploy.prototxt", RES_129),
    "embs321": ("embs/deploy.prototxt", {}),
    "res513": ("res/deploy.prototxt", {}),
}


def sized(name, size):
    """NETS' substitutions for `name` at input size `size` (None: the entry's own)."""
    path, sizes = NETS[name]
    if size is None:
        return sizes
    if path.startswith("res"):  # its three scales and the label map, as RES_129: (d - 1) * (size - 1) / 512 + 1
        return {d: str((int(d) - 1) * (size - 1) // 512 + 1) for d in ("513", "385", "257", "65")}
    return {"321": str(size)}


def label(name, size):
    return name if size is None or name not in NETS else re.sub(r"\d+$", str(size), name)


def config_text(name, size=None):
    path, sizes = NETS[name][0], sized(name, size)
    text = (REFERENCE / path).read_text()
    if not sizes:
        return text
    pattern = re.compile(r"\b((?:dim|height|width|tiles):\s*)(\d+)\b")
    return pattern.sub(lambda m: m.group(1) + sizes.get(m.group(2), m.group(2)), text)


def peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def timed_in_turn(runs_by_name, runs):
    """{name_best, name_median (wall), name_cpu (best process CPU time)} of functions timed in turn, run by run."""
    wall, cpu = {name: [] for name in runs_by_name}, {name: [] for name in runs_by_name}
    for _ in range(runs):
        for name, fn in runs_by_name.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    out = {}
    for name in runs_by_name:
        times = sorted(wall[name])
        out[f"{name}_best"], out[f"{name}_median"], out[f"{name}_cpu"] = times[0], times[len(times) // 2], min(cpu[name])
    return out


def torch_forward(module, feed, device):
    """A forward of a torch module (a TorchNet or its compiled form) under inference_mode."""
    import torch

    def run():
        with torch.inference_mode():
            module(**feed)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def child(args):
    """One measurement in this process; prints one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if args.child_net in NETS:
        text, where = config_text(args.child_net, args.size), None
    else:
        where = Path(args.child_net)
        text = where.read_text()
    from caffe_layers import Net, native
    from caffe_layers.engine.graph import TorchNet

    device = torch.device(args.device)
    result = {}
    if args.mode in ("ours", "pycaffe", "compiled", "recompiled"):
        start = time.perf_counter()
        net = (Net(text, phase="test") if args.mode == "pycaffe" else TorchNet(text, phase="test"))
        result["build"] = time.perf_counter() - start
        shapes = net.blob_shapes
        rng = np.random.default_rng(0)
        inputs = {name: rng.standard_normal(shapes[name]).astype(np.float32) for name in net.inputs}
        if args.mode != "pycaffe":
            net.to(device)
            feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
            run = torch_forward(net, feed, device)
        if args.mode in ("compiled", "recompiled"):  # the eager net, then the compiled module, on the same inputs
            from torch._dynamo.utils import counters

            eager = run
            eager()  # both processes compile after an eager forward, so that they capture the same graph
            run = torch_forward(torch.compile(net, fullgraph=True), feed, device)
            start, cpu = time.perf_counter(), time.process_time()
            run()
            result["compile"], result["compile_cpu"] = time.perf_counter() - start, time.process_time() - cpu
            result["cache_hits"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
            if args.mode == "compiled":  # eager and compiled forwards in turn: both see the same machine load
                run()
                figures = timed_in_turn({"eager": eager, "forward": run}, args.runs)
                result.update(figures)
            print(json.dumps(result))
            return
        elif args.mode == "pycaffe":
            def run():
                net.forward(**inputs)
        run()  # warm-up
        result["forward_best"], result["forward_median"] = timed(run, args.runs)
        result["native_cpu"] = native.available("cpu")
    else:  # opencv: the same weights, saved by us as a .caffemodel
        import cv2

        cv2.setNumThreads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            proto, model = Path(tmp) / "net.prototxt", Path(tmp) / "net.caffemodel"
            proto.write_text(text)
            torch.manual_seed(0)
            ours = TorchNet(text, phase="test")
            ours.save(model)
            start = time.perf_counter()
            net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
            result["build"] = time.perf_counter() - start
        shapes = ours.blob_shapes
        rng = np.random.default_rng(0)
        for name in ours.inputs:
            net.setInput(rng.standard_normal(shapes[name]).astype(np.float32), name)
        net.forward()
        result["forward_best"], result["forward_median"] = timed(net.forward, args.runs)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


LENET = "examples/mnist/lenet_train_test.prototxt"
TRAIN_NETS = ("lenet", "logreg", "embs", "vgg")


def lenet_solver(tmp, bvlc_repo):
    """BVLC's LeNet example (read from a git snapshot of BVLC/caffe) over a generated MNIST-sized LMDB."""
    import lmdb
    import numpy as np

    from caffe_layers.formats.proto import pb

    rng = np.random.default_rng(0)
    db = Path(tmp) / "mnist_lmdb"
    env = lmdb.open(str(db), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i in range(2000):
            datum = pb.Datum(channels=1, height=28, width=28, label=int(rng.integers(10)),
                             data=rng.integers(0, 256, 28 * 28, dtype=np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    show = ["git", "-C", str(bvlc_repo), "show"]
    net = subprocess.run(show + [f"HEAD:{LENET}"], capture_output=True, text=True, check=True).stdout
    net = re.sub(r'source: "[^"]*"', f'source: "{db}"', net)
    (Path(tmp) / "lenet.prototxt").write_text(net)
    solver = (f'net: "{Path(tmp) / "lenet.prototxt"}"\nbase_lr: 0.01 momentum: 0.9 weight_decay: 0.0005\n'
              f'lr_policy: "inv" gamma: 0.0001 power: 0.75 max_iter: 100000\n')
    (Path(tmp) / "solver.prototxt").write_text(solver)
    return Path(tmp) / "solver.prototxt"


def logreg_solver(tmp):
    """BVLC's examples/brewing-logreg.ipynb solver: HDF5Data -> InnerProduct -> Accuracy/SoftmaxWithLoss (batch 10),
    10,000 SGD iterations, a test of 250 batches every 1,000 and a snapshot at the end; the notebook's data
    (sklearn's make_classification, 4 features, 7,500/2,500 rows) replaced by numpy draws of the same sizes."""
    import h5py
    import numpy as np

    from caffe_layers import pycaffe as caffe
    from caffe_layers.pycaffe import layers as L

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10000, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.standard_normal(10000) > 0).astype(np.float32)
    tmp = Path(tmp)
    with h5py.File(tmp / "train.h5", "w") as f:
        f["data"], f["label"] = x[:7500], y[:7500]
    (tmp / "train.txt").write_text(f"{tmp / 'train.h5'}\n" * 2)  # the notebook lists the file twice
    with h5py.File(tmp / "test.h5", "w") as f:
        f.create_dataset("data", data=x[7500:], compression="gzip", compression_opts=1)
        f.create_dataset("label", data=y[7500:], compression="gzip", compression_opts=1)
    (tmp / "test.txt").write_text(f"{tmp / 'test.h5'}\n")
    for phase in ("train", "test"):
        n = caffe.NetSpec()
        n.data, n.label = L.HDF5Data(batch_size=10, source=str(tmp / f"{phase}.txt"), ntop=2)
        n.ip1 = L.InnerProduct(n.data, num_output=2, weight_filler=dict(type="xavier"))
        n.accuracy = L.Accuracy(n.ip1, n.label)
        n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
        (tmp / f"{phase}.prototxt").write_text(str(n.to_proto()))
    s = caffe.proto.caffe_pb2.SolverParameter(
        train_net=str(tmp / "train.prototxt"), test_net=[str(tmp / "test.prototxt")], test_interval=1000,
        test_iter=[250], max_iter=10000, base_lr=0.01, lr_policy="step", gamma=0.1, stepsize=5000, momentum=0.9,
        weight_decay=5e-4, display=1000, snapshot=10000, snapshot_prefix=str(tmp / "train"),
        solver_mode=caffe.proto.caffe_pb2.SolverParameter.CPU)
    (tmp / "solver.prototxt").write_text(str(s))
    return tmp / "solver.prototxt"


def segaware_solver(tmp, net, crop):
    """The segaware fork's `net` TRAIN config and solver (../shared/reference/segaware) over synthetic
    VOC-style images (caffe_layers/training/synthetic.py) cropped to `crop`; no snapshots, no display."""
    from caffe_layers.formats.prototxt import read_net, read_solver
    from caffe_layers.training import synthetic

    root = Path(tmp) / "VOC"
    synthetic.write_voc(root, 4, crop + 32, crop + 32, list_name="train")
    data = json.loads((ROOT / "models" / "segaware" / "variables.json").read_text())
    v = {**data["common"], **data[net], "EXP": str(root), "TRAIN_SET": "train", "DATA_ROOT": f"{root}/",
         "CROP_SIZE": crop, "SOLVER_MODE": "CPU"}
    param = read_solver(REFERENCE / net / "solver.prototxt", v)
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(read_net(REFERENCE / net / "train.prototxt", v))
    param.snapshot, param.display, param.snapshot_after_train = 0, 0, False
    return param


def train_child(args):
    """One training measurement in this process; prints one JSON line."""
    import caffe_layers  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
    import torch

    torch.set_num_threads(args.threads)
    from caffe_layers import pycaffe as caffe
    from caffe_layers.training.solver import Solver

    with tempfile.TemporaryDirectory() as tmp:
        if args.child_net == "logreg":  # the notebook's %%timeit cell: get_solver and solve
            path = logreg_solver(tmp)
            wall, cpu = time.perf_counter(), time.process_time()
            caffe.get_solver(str(path)).solve()
            print(json.dumps({"solve": time.perf_counter() - wall, "solve_cpu": time.process_time() - cpu}))
            return
        if args.child_net == "lenet":
            solver, iters = Solver(str(lenet_solver(tmp, args.bvlc))), args.iters
        else:
            solver, iters = Solver(segaware_solver(tmp, args.child_net, args.crop)), args.seg_iters
        solver.step(2)  # warm-up
        best = best_cpu = float("inf")
        for _ in range(args.runs):
            wall, cpu = time.perf_counter(), time.process_time()
            solver.step(iters)
            best = min(best, (time.perf_counter() - wall) / iters)
            best_cpu = min(best_cpu, (time.process_time() - cpu) / iters)
    print(json.dumps({"iteration": best, "iteration_cpu": best_cpu, "peak_rss_mb": peak_rss_mb()}))


def train_figures(args):
    """The --train table: one fresh process per net."""
    print(f"Training, {args.threads} threads, best of {args.runs} runs after a warm-up (wall; process CPU time "
          f"in brackets: on a shared machine that is the steadier figure)")
    for name in args.train.split(","):
        cmd = [sys.executable, __file__, "--child-net", name, "--runs", str(args.runs), "--iters", str(args.iters),
               "--seg-iters", str(args.seg_iters), "--crop", str(args.crop), "--threads", str(args.threads),
               "--bvlc", args.bvlc]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if done.returncode:
            print(f"{name}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if name == "logreg":
            print(f"brewing-logreg solve (10,000 iterations + 11 tests of 250 batches): {r['solve']:.2f} s "
                  f"[{r['solve_cpu']:.2f} s CPU]; the original Caffe: ~0.2 s (issue 15's figure) -> "
                  f"{r['solve'] / 0.2:.1f}x its time")
        elif name == "lenet":
            it = r["iteration"]
            print(f"LeNet solver iteration (batch 64): {it * 1e3:.1f} ms [{r['iteration_cpu'] * 1e3:.1f} ms CPU], "
                  f"{1 / it:.0f} it/s; the original Caffe: 34 ms (issue 14's figure, `caffe train`, 2 threads) "
                  f"-> x{0.034 / it:.2f}")
        else:
            it = r["iteration"]
            print(f"segaware {name} TRAIN (crop {args.crop}, batch 1, iter_size as its solver): {it:.2f} s an "
                  f"iteration [{r['iteration_cpu']:.2f} s CPU], {1 / it:.2f} it/s, peak {r['peak_rss_mb']:.0f} MB")


def measure(net, mode, args, cache=None):
    """One child process; `cache`: torch.compile's cache directory (default: a fresh one, a cold compile)."""
    cmd = [sys.executable, __file__, "--child-net", str(net), "--mode", mode, "--runs", str(args.runs),
           "--threads", str(args.threads), "--device", args.device]
    if args.size is not None:
        cmd += ["--size", str(args.size)]
    with tempfile.TemporaryDirectory() as fresh:
        env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHINDUCTOR_CACHE_DIR=str(cache or fresh))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_compiled(net, args):
    """The eager and compiled figures with a cold compile, then a warm compile in a fresh process over the
    same cache directory (kept under --cache-dir, else temporary)."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) / re.sub(r"\W", "_", str(net)) if args.cache_dir else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        first_cold = not any(cache.iterdir())
        figures = measure(net, "compiled", args, cache)
        if "error" not in figures:
            warm = measure(net, "recompiled", args, cache)
            figures["warm"] = warm.get("compile", float("nan"))
            figures["warm_hits"] = warm.get("cache_hits", warm.get("error"))
        figures["first_cold"] = first_cold
    return figures


def baselines():
    """{net: (build s, forward best s, peak MB)} from the original Caffe's table."""
    out = {}
    if not BASELINES.exists():
        return out
    for line in BASELINES.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].split()[0] in NETS:
            nums = [float(re.sub(r"[^\d.]", "", c) or "nan") for c in cells[1:]]
            out[cells[0].split()[0]] = (nums[0], nums[1], nums[3])
    return out


def row(label, figures, reference=None):
    if "error" in figures:
        return f"{label:28s} failed: {figures['error']}"
    text = (f"{label:28s} build {figures['build']:7.3f} s  forward best {figures['forward_best']:7.3f} s  "
            f"median {figures['forward_median']:7.3f} s  peak {figures['peak_rss_mb']:8.0f} MB")
    if reference:
        text += f"  | x{reference['forward_best'] / figures['forward_best']:.2f} faster"
    return text


def compiled_row(label, figures):
    if "error" in figures:
        return f"{label:12s} failed: {figures['error']}"
    first = "cold" if figures["first_cold"] else "first (kept cache)"
    return (f"{label:12s} eager best {figures['eager_best']:7.3f} s median {figures['eager_median']:7.3f} s | "
            f"compiled best {figures['forward_best']:7.3f} s median {figures['forward_median']:7.3f} s | "
            f"x{figures['eager_best'] / figures['forward_best']:.2f} (best) x"
            f"{figures['eager_median'] / figures['forward_median']:.2f} (median) x"
            f"{figures['eager_cpu'] / figures['forward_cpu']:.2f} (best CPU time) | compile {first} "
            f"{figures['compile']:6.1f} s ({figures['compile_cpu']:.1f} s main-process CPU), warm {figures['warm']:6.1f} s\n"
            f"{'':12s} inductor cache counters: first {figures['cache_hits']}, warm {figures['warm_hits']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="standard Caffe deploy prototxts, also run on OpenCV dnn")
    parser.add_argument("--nets", default="vgg321,res129,embs321", help="comma list of "
                        f"{', '.join(NETS)}; 'all' or 'none'")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", nargs="?", const="lenet,logreg,embs,vgg", help="training figures instead of "
                        "forward passes, for a comma list of lenet (BVLC's example over a generated LMDB; needs "
                        "--bvlc), logreg (BVLC's brewing-logreg solve), embs, vgg (default: all four)")
    parser.add_argument("--bvlc", default=str(ROOT.parent / ".mirror" / "BVLC+caffe" / "repo"),
                        help="a git checkout or snapshot of BVLC/caffe (for its LeNet example)")
    parser.add_argument("--iters", type=int, default=50, help="LeNet iterations a run")
    parser.add_argument("--seg-iters", type=int, default=2, help="segaware iterations a run")
    parser.add_argument("--crop", type=int, default=161, help="segaware crop size")
    parser.add_argument("--compile", action="store_true", help="eager against torch.compile(fullgraph=True) "
                        "forward times and the compile time, for --nets and the configs")
    parser.add_argument("--size", type=int, help="--nets' segaware nets at this input size (default: their own)")
    parser.add_argument("--cache-dir", help="--compile: keep each net's inductor cache under this directory (a "
                        "second invocation then compiles warm from the start; default: temporary ones)")
    parser.add_argument("--child-net", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_net:
        return train_child(args) if args.child_net in TRAIN_NETS else child(args)
    if args.train:
        return train_figures(args)
    names = list(NETS) if args.nets == "all" else [] if args.nets == "none" else args.nets.split(",")
    if args.compile:
        print(f"{args.threads} threads, {args.device}, best/median of {args.runs} runs after a warm-up; "
              f"each net a fresh process, eager then torch.compile(fullgraph=True) in it, their runs in turn")
        for name in names + args.configs:
            print(compiled_row(label(name, args.size) if name in NETS else Path(name).parent.name,
                               measure_compiled(name, args)), flush=True)
        return
    base = baselines()
    print(f"{args.threads} threads, {args.device}, best/median of {args.runs} runs after a warm-up; "
          f"each row a fresh process")
    for name in names:
        ours, py = measure(name, "ours", args), measure(name, "pycaffe", args)
        print(row(f"{label(name, args.size)} ours (TorchNet)", ours))
        print(row(f"{label(name, args.size)} pycaffe Net", py))
        if name in base and args.size is None and "error" not in ours:
            b_build, b_fwd, b_mem = base[name]
            print(f"{name} original Caffe (baselines) build {b_build:.2f} s, forward best {b_fwd:.3f} s, "
                  f"peak {b_mem:.0f} MB -> ours x{b_fwd / ours['forward_best']:.2f} faster "
                  f"(pycaffe x{b_fwd / py.get('forward_best', float('nan')):.2f}), build x"
                  f"{b_build / ours['build']:.2f}, memory x{ours['peak_rss_mb'] / b_mem:.2f} "
                  f"(another day's figures: approximate)")
    for config in args.configs:
        cv = measure(config, "opencv", args)
        ours = measure(config, "ours", args)
        print(row(f"{Path(config).parent.name} OpenCV dnn", cv))
        print(row(f"{Path(config).parent.name} ours (TorchNet)", ours, cv if "error" not in cv else None))


if __name__ == "__main__":
    main()
