#!/usr/bin/env python3
"""The CUDA path in one go, on a machine with an NVIDIA GPU (issue 19).

    python tools/gpu_check.py OUT_DIR [--bundle DIR] [--no-install] [--budget SECONDS]
    python tools/gpu_check.py --prepare DIR [--python 3.12]   # where pip reaches an index: the offline bundle

From a clean checkout: installs the project (its CUDA module built by nvcc for the GPU found), runs the tests that
need a GPU (pytest -m gpu), checks every CUDA kernel against the CPU kernels on random inputs, times the kernels
(benchmarks/bench_native.py --device cuda against the pure-PyTorch references on the GPU, and the CPU kernels
alone), the SPN scan (32x64x64 and 32x128x128) and the whole nets (vgg deploy 321, res deploy 513), and tries the
data-parallel training path on NCCL (one GPU; two ranks on it). Writes OUT_DIR/report.txt, OUT_DIR/figures.json
and OUT_DIR/log.txt (every step's output). Steps that would overrun --budget are skipped and reported as such.
Without a GPU it refuses in one line (exit status 2). --bundle DIR (made by --prepare): wheels installed offline
and DIR/shared linked as ../shared (the golden tensors some GPU tests read) where that is missing.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("report.txt", "figures.json", "log.txt", "junit.xml")
# what the project needs beyond an image with CUDA torch, numpy, scipy, h5py, Pillow, tqdm, matplotlib and
# pybind11 (the build's grpcio-tools, its grpcio and protobuf, and lmdb); --prepare pins the versions installed here
BUNDLE_PACKAGES = ("grpcio-tools", "grpcio", "protobuf", "lmdb")
# step: (most seconds it may take, seconds it needs to be worth starting)
STEPS = {"install": (240, 60), "kernels": (90, 20), "tests": (150, 30), "spn": (90, 20),
         "bench_cuda": (180, 40), "nccl": (90, 20), "bench_cpu": (120, 30)}


class Refusal(SystemExit):
    """One line on stderr, exit status 2."""

    def __init__(self, line):
        super().__init__(2)
        self.line = line


# ---- no GPU, no check ------------------------------------------------------------------------------------
def gpu_problem():
    """None when torch sees a CUDA device, else why not (one phrase)."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable ({err})"
    if torch.cuda.is_available():
        return None
    smi = _nvidia_smi("name")
    if smi and torch.version.cuda is None:
        return f"nvidia-smi sees {smi[0]} but torch {torch.__version__} is a CPU-only build; install a CUDA build"
    return f"no NVIDIA GPU visible (torch {torch.__version__}: no CUDA device; nvidia-smi: {smi[0] if smi else 'none'})"


def _nvidia_smi(fields):
    if not shutil.which("nvidia-smi"):
        return []
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                          text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


# ---- running the steps -------------------------------------------------------------------------------------
class Log:
    """log.txt gets everything; the console gets progress lines and the steps' output, indented."""

    def __init__(self, path):
        self.file = open(path, "w")
        self.start = time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.start

    def progress(self, text):
        line = f"[gpu_check {int(self.elapsed()) // 60:02d}:{int(self.elapsed()) % 60:02d}] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def output(self, line):
        print("    " + line, flush=True)
        self.file.write(line + "\n")


def run_command(cmd, log, timeout, env=None, cwd=ROOT):
    """(exit status, output lines) of cmd, its output streamed as it comes; 124 when it ran past timeout
    (its whole process group is ended)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log.output(lines[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = 124
        lines.append(f"(ended after {timeout:.0f} s: past its time)")
        log.output(lines[-1])
    reader.join(5)
    return status, lines


def _python(*args):
    return [sys.executable, *args]


def _step_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


# ---- the environment and the install ---------------------------------------------------------------------
def environment():
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    nvcc = shutil.which("nvcc")
    nvcc_version = ""
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        nvcc_version = out[-2] if len(out) >= 2 else (out[-1] if out else "")
    nccl = None
    with contextlib.suppress(Exception):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "arch": f"{major}{minor}",
            "nvidia_smi": _nvidia_smi("name,driver_version,compute_cap,memory.total"), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "nccl": nccl, "python": sys.version.split()[0],
            "nvcc": nvcc or None, "nvcc_version": nvcc_version, "cpu_threads": os.cpu_count()}


def install(env_info, bundle, log, timeout):
    """pip install -e . with the CUDA module built for this GPU's arch; offline from the bundle's wheels."""
    if not env_info["nvcc"]:
        return {"ok": False, "why": "no nvcc on PATH: the CUDA module cannot be built"}
    deadline = time.monotonic() + timeout
    env = dict(os.environ, CAFFE_LAYERS_CUDA_ARCHS=env_info["arch"], PYTHONUNBUFFERED="1")
    result = {"archs": env_info["arch"]}
    if bundle:
        wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
        if wheels:
            status, _ = run_command(_python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
                                            *wheels), log, deadline - time.monotonic(), env)
            if status:
                return dict(result, ok=False, why=f"installing the bundle's wheels failed (status {status})")
        shared, beside = bundle / "shared", ROOT.parent / "shared"
        if shared.is_dir() and not beside.exists():
            beside.symlink_to(shared.resolve(), target_is_directory=True)
            result["shared"] = f"{beside} -> {shared.resolve()}"
        cmd = _python("-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-e", ".")
    else:
        cmd = _python("-m", "pip", "install", "-q", "-e", ".")
    start = time.monotonic()
    status, lines = run_command(cmd, log, deadline - time.monotonic(), env)
    result["build_s"] = time.monotonic() - start
    if status:
        return dict(result, ok=False, why=f"pip install -e . failed (status {status}): {lines[-1] if lines else ''}")
    probe = ("from caffe_layers import native; import caffe_layers.native._native_cuda as m; "
             "print(m.probe() or 'ok', native.available('cuda'))")
    status, lines = run_command(_python("-c", probe), log, 60, _step_env())
    ok = status == 0 and lines[-1:] == ["ok True"]
    return dict(result, ok=ok, why=None if ok else f"the CUDA module does not load: {lines[-1:] or status}")


# ---- the tests ---------------------------------------------------------------------------------------------
def junit_outcomes(path):
    """[{test, outcome (passed/failed/error/skipped), message}] from a pytest --junitxml file."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (child.get("message") or "").strip().splitlines()[0][:200] if child.get("message") else ""
                break
        outcomes.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                         "message": message})
    return outcomes


def run_tests(out, log, timeout):
    junit = out / "junit.xml"
    status, lines = run_command(_python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                        f"--junitxml={junit}", "tests"), log, timeout, _step_env())
    outcomes = junit_outcomes(junit) if junit.exists() else []
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("passed", "failed", "error", "skipped")}
    return {"status": status, "counts": counts, "tests": outcomes, "summary": lines[-1] if lines else ""}


# ---- every CUDA kernel against the CPU kernels ---------------------------------------------------------------
def kernel_cases(small=False, seed=0):
    """(name, function, inputs): each native kernel forward and backward through caffe_layers.native, on float64
    CPU tensors. small: shapes the host emulation runs in a moment; else shapes that fill several blocks."""
    import torch

    from caffe_layers.native import gate_recurrent, im2dist, im2parity, norm_conv_filter, segaware_conv
    from caffe_layers.ops.spn import DIRECTIONS

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    N, C, H, W = (2, 3, 9, 11) if small else (2, 8, 45, 67)
    x = rand(N, C, H, W)
    x[:, :, 1] = x[:, :, 2]  # equal neighbours: sign(0) in the L1 backward
    cases = []
    for norm, rc, rb, true_gradient in (("L1", False, False, False), ("L1", True, True, False),
                                        ("L1", False, True, True), ("L2", True, False, False)):
        cases.append((f"im2dist {norm}{' true gradient' if true_gradient else ''} rc={rc} rb={rb} 5x5 dil 2",
                      lambda t, a=(norm, rc, rb, true_gradient): im2dist(t, 5, 4, 1, 2, *a), [x]))
    cases.append(("im2dist L2 3x3 stride 2", lambda t: im2dist(t, 3, 1, 2, 1, "L2"), [x]))
    labels = torch.randint(0, 4, (N, 1, H, W), generator=g).double()
    labels[:, :, 0, :3] = 255
    cases.append(("im2parity 5x5 ignore 255", lambda t: im2parity(t, 5, 2, 1, 1, 255), [labels]))
    cases.append(("im2parity 3x3 dil 3 no ignore", lambda t: im2parity(t, 3, 3, 1, 3, None), [labels]))
    sh = (1, 2, 7, 37) if small else (2, 3, 70, 300)  # lines longer and more numerous than a block's threads
    xs, gates = rand(*sh), [0.3 * rand(*sh) for _ in range(3)]
    for (hz, rv), name in DIRECTIONS.items():
        cases.append((f"spn three-way {name}", lambda *t, d=(hz, rv): gate_recurrent(*t, *d), [xs, *gates]))
        cases.append((f"spn one-way {name}", lambda a, b, d=(hz, rv): gate_recurrent(a, b, None, None, *d, "one"),
                      [xs, gates[0]]))
    O = 5
    mask, w, b = rand(N, 9, H, W).exp(), 0.2 * rand(O, C, 3, 3), rand(O)
    cases.append(("seg-aware conv 3x3", lambda *t: segaware_conv(*t, 3, 1, 1, 1), [x, mask, w, b]))
    mask2 = rand(N, 9, (H - 1) // 2 + 1, (W - 1) // 2 + 1).exp()
    cases.append(("seg-aware conv 3x3 stride 2 no bias", lambda a, m, ww: segaware_conv(a, m, ww, None, 3, 1, 2, 1),
                  [x, mask2, w]))
    dist = rand(N, 25, H, W).abs()
    wd = 0.2 * rand(C, 1, 5, 5)
    cases.append(("norm conv depthwise 5x5 (grouped filtering)",
                  lambda a, d, ww: norm_conv_filter(a, d, ww, None, None, 2, 1, 1, C), [x, dist, wd]))
    groups = C // 2 if C % 2 == 0 else 1
    wg = 0.2 * rand(2 * groups, C // groups, 5, 5)
    cases.append((f"norm conv {groups} groups 5x5 with bias",
                  lambda a, d, ww, bb: norm_conv_filter(a, d, ww, bb, None, 2, 1, 1, groups), [x, dist, wg,
                                                                                             rand(2 * groups)]))
    return cases


def _forward_backward(fn, inputs, device, dtype):
    import torch

    xs = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True) for t in inputs]
    y = fn(*xs)
    if not y.requires_grad:  # im2parity: no backward
        return [y.detach().cpu().double()]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(gy.to(device=device, dtype=dtype))
    return [y.detach().cpu().double()] + [t.grad.cpu().double() for t in xs if t.grad is not None]


TOLERANCE = {"float64": 1e-9, "float32": 1e-4}  # largest error over max(1, largest |CPU value|), per output


def check_kernels(device, candidate=contextlib.nullcontext, small=False):
    """Each kernel case on `device` (inside `candidate`: which kernels run there) against the CPU kernels on the
    same inputs, float64 and float32: [{kernel, dtype, outputs, max_abs, error, ok}]."""
    import torch

    results = []
    for name, fn, inputs in kernel_cases(small):
        for dtype in (torch.float64, torch.float32):
            dt = str(dtype).split(".")[1]
            want = _forward_backward(fn, inputs, "cpu", dtype)
            with candidate():
                got = _forward_backward(fn, inputs, device, dtype)
            max_abs = error = 0.0
            if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
                max_abs = error = float("inf")
            else:
                for a, b in zip(got, want):
                    diff = (a - b).abs().max().item() if a.numel() else 0.0
                    diff = float("inf") if diff != diff else diff  # NaN
                    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
                    max_abs, error = max(max_abs, diff), max(error, diff / scale)
            results.append({"kernel": name, "dtype": dt, "outputs": len(want), "max_abs": max_abs, "error": error,
                            "ok": error <= TOLERANCE[dt]})
    return results


# ---- SPN scan timings ----------------------------------------------------------------------------------------
def time_call(fn, device, repeat):
    """Best seconds of fn() after two warm-ups (CUDA: between events, synchronised once at the end)."""
    import torch

    for _ in range(2):
        fn()
    if device.type != "cuda":
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return min(start.elapsed_time(end) for start, end in events) / 1e3


def spn_times(device, shapes=((1, 32, 64, 64), (1, 32, 128, 128)), repeat=20):
    """SPN three-way scan per direction: forward and forward+backward seconds, native kernels on `device`,
    the pure-PyTorch reference on `device`, and the native CPU kernels."""
    import torch

    from caffe_layers import native
    from caffe_layers.native import gate_recurrent
    from caffe_layers.ops.spn import DIRECTIONS

    device = torch.device(device)
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(shape, generator=g)] + [0.3 * torch.rand(shape, generator=g) for _ in range(3)]
        for (hz, rv), name in DIRECTIONS.items():
            row = {"shape": list(shape), "direction": name}
            for where, dev, ref, reps in (("native", device, False, repeat), ("reference", device, True, 3),
                                          ("cpu_native", torch.device("cpu"), False, 3)):
                ins = [t.to(dev).requires_grad_(True) for t in base]

                def forward():
                    with torch.no_grad():
                        gate_recurrent(*ins, hz, rv)

                def forward_backward():
                    gate_recurrent(*ins, hz, rv).backward(ins[0].detach())

                with native.disabled() if ref else contextlib.nullcontext():
                    row[f"{where}_forward_s"] = time_call(forward, dev, reps)
                    row[f"{where}_forward_backward_s"] = time_call(forward_backward, dev, reps)
            rows.append(row)
    return rows


# ---- NCCL and the data-parallel training path ----------------------------------------------------------------
TINY_NET = """name: "gpu_check"
layer { name: "data" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "LIST" batch_size: 4 } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


def _tiny_solver(folder):
    import h5py
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.randn(16, 3).astype(np.float32)
    with h5py.File(folder / "d.h5", "w") as f:
        f["x"], f["y"] = x, (x @ rng.randn(3, 2) + 0.5).astype(np.float32)
    (folder / "list.txt").write_text(f"{folder / 'd.h5'}\n")
    (folder / "net.prototxt").write_text(TINY_NET.replace("LIST", str(folder / "list.txt")))
    (folder / "solver.prototxt").write_text(f'net: "{folder / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                                            f'max_iter: 20\ndisplay: 10\nrandom_seed: 5\n'
                                            f'snapshot_prefix: "{folder / "snap"}"\n')  # snapshots stay in folder
    return folder / "solver.prototxt"


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _start(cmd, env, log_path):
    """A process whose stderr goes to log_path (a file: no pipe to fill while another rank waits on it)."""
    with open(log_path, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=Path(log_path).parent), log_path


def _finish(started, timeout):
    """(exit status, stderr) of a _start-ed process, ended after `timeout` seconds (status 124) if it hangs."""
    proc, log_path = started
    try:
        status = proc.wait(timeout=timeout)
        hung = ""
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status, hung = 124, f"\n(ended after {timeout} s: it hung)"
    return status, Path(log_path).read_text() + hung


def nccl_checks(timeout=60):
    """The training path on CUDA: one process on GPU 0; `--gpu 0,0` (must refuse in one line); two torchrun-style
    ranks on GPU 0 with NCCL (they train, or refuse in one line each)."""
    import socket

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        solver = _tiny_solver(Path(tmp))
        train = _python("-m", "caffe_layers.tools.cli", "train", "--solver", str(solver), "--no-progress")
        env, folder = _step_env(), Path(tmp)
        status, err = _finish(_start(train + ["--gpu", "0"], env, folder / "one.log"), timeout)
        losses = [line.split("loss = ")[1] for line in err.splitlines() if ", loss = " in line]
        results["one_gpu"] = {"status": status, "losses": losses, "last_line": _last_line(err)}
        status, err = _finish(_start(train + ["--gpu", "0,0"], env, folder / "dup.log"), timeout)
        results["gpu_0_0"] = {"status": status, "stderr_lines": len(err.strip().splitlines()), "last_line": _last_line(err)}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [_start(train, dict(env, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT=str(port)), folder / f"rank{r}.log") for r in range(2)]
        ranks = []
        for r, started in enumerate(procs):
            status, err = _finish(started, timeout)
            losses = [line.split("loss = ")[1] for line in err.splitlines() if ", loss = " in line]
            ranks.append({"rank": r, "status": status, "losses": losses, "last_line": _last_line(err),
                          "traceback": "Traceback" in err})
        results["two_ranks_one_gpu"] = ranks
    return results


# ---- the report ---------------------------------------------------------------------------------------------
def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:9.3f}"


def _ratio(a, b):
    return "-" if not a or not b else f"{a / b:7.1f}x"


def render_report(fig):
    """report.txt's text from the figures (figures.json's content)."""
    out = [f"caffe_layers GPU check ({fig.get('started', '')}), {fig.get('elapsed_s', 0):.0f} s "
           f"of a {fig.get('budget_s', 0):.0f} s budget; verdict: {fig.get('verdict', '?')}"]
    env = fig.get("environment", {})
    out += ["", "== machine", *(f"  {k}: {v}" for k, v in env.items())]
    out += ["", "== steps"]
    for name, step in fig.get("steps", {}).items():
        out.append(f"  {name:<11} {step['state']:<8} {step.get('seconds', 0):6.1f} s  {step.get('note') or ''}".rstrip())
    inst = fig.get("install")
    if inst:
        out += ["", "== install", *(f"  {k}: {v}" for k, v in inst.items())]
    tests = fig.get("tests")
    if tests:
        c = tests["counts"]
        out += ["", f"== CUDA tests (pytest -m gpu): {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                    f"{c['skipped']} skipped"]
        out += [f"  {t['outcome']:<7} {t['test']}" + (f"  ({t['message']})" if t["message"] else "")
                for t in tests["tests"]]
    kernels = fig.get("kernels")
    if kernels:
        bad = sum(not k["ok"] for k in kernels)
        out += ["", f"== CUDA kernels against the CPU kernels, random inputs: {len(kernels) - bad} of {len(kernels)} "
                    f"within tolerance (error = max |CUDA - CPU| / max(1, max |CPU|); float64 <= "
                    f"{TOLERANCE['float64']:g}, float32 <= {TOLERANCE['float32']:g})"]
        out += [f"  {'ok ' if k['ok'] else 'BAD'} {k['kernel']:<48} {k['dtype']:<8} {k['outputs']} outputs  "
                f"max abs {k['max_abs']:.3g}  error {k['error']:.3g}" for k in kernels]
    ops = fig.get("ops")
    if ops:
        out += ["", "== kernels, ms (native CUDA; pure PyTorch on the GPU; native CPU; best of several)",
                f"  {'op':<60} {'CUDA':>9} {'PyTorch':>9} {'CPU':>9} {'vs PyTorch':>10} {'vs CPU':>8}"]
        for o in ops:
            out.append(f"  {o['title']:<60} {_ms(o.get('cuda_s'))} {_ms(o.get('reference_s'))} {_ms(o.get('cpu_s'))} "
                       f"{_ratio(o.get('reference_s'), o.get('cuda_s')):>10} {_ratio(o.get('cpu_s'), o.get('cuda_s')):>8}")
    spn = fig.get("spn")
    if spn:
        out += ["", "== SPN three-way scan layer, ms (the paper: 1.3 ms at 32x64x64 on a 2017 GPU; aim <= 0.1 ms)",
                f"  {'shape':<16} {'direction':<13} {'fwd CUDA':>9} {'fwd+bwd':>9} {'PyTorch fwd':>11} "
                f"{'fwd+bwd':>9} {'CPU fwd':>9} {'fwd+bwd':>9}"]
        for r in spn:
            out.append(f"  {'x'.join(map(str, r['shape'][1:])):<16} {r['direction']:<13} {_ms(r['native_forward_s'])} "
                       f"{_ms(r['native_forward_backward_s'])} {_ms(r['reference_forward_s']):>11} "
                       f"{_ms(r['reference_forward_backward_s'])} {_ms(r['cpu_native_forward_s'])} "
                       f"{_ms(r['cpu_native_forward_backward_s'])}")
    nets = fig.get("nets")
    if nets:
        out += ["", "== whole-net forward on CUDA (benchmarks/bench_native.py)"]
        out += [f"  {n['net']} deploy {n['variant']:<22} {n['forward_s'] * 1e3:9.1f} ms  peak +{n['peak_bytes'] / 2**20:8.1f} MiB"
                f"  inputs {n['inputs']}" for n in nets]
    nccl = fig.get("nccl")
    if nccl:
        out += ["", "== data-parallel training on NCCL"]
        one = nccl["one_gpu"]
        out.append(f"  --gpu 0: status {one['status']}, losses {', '.join(one['losses']) or '-'}"
                   + ("" if one["status"] == 0 else f"; {one['last_line']}"))
        dup = nccl["gpu_0_0"]
        out.append(f"  --gpu 0,0: status {dup['status']}, {dup['stderr_lines']} stderr line(s): {dup['last_line']}")
        for r in nccl["two_ranks_one_gpu"]:
            out.append(f"  two ranks on GPU 0 (torchrun env), rank {r['rank']}: status {r['status']}"
                       + (f", losses {', '.join(r['losses'])}" if r["losses"] else "")
                       + (", with a traceback" if r["traceback"] else "") + f"; {r['last_line']}")
    return "\n".join(out) + "\n"


def merge_ops(cuda, cpu):
    """bench_native --json figures on CUDA and on the CPU (--no-reference) as one row per op."""
    cpu_by_title = {o["title"]: o["native_s"] for o in (cpu or {}).get("ops", [])}
    rows = [{"title": o["title"], "cuda_s": o["native_s"], "reference_s": o.get("reference_s"),
             "cpu_s": cpu_by_title.pop(o["title"], None), "cuda_peak_bytes": o["native_peak_bytes"],
             "reference_peak_bytes": o.get("reference_peak_bytes")} for o in (cuda or {}).get("ops", [])]
    return rows + [{"title": t, "cuda_s": None, "reference_s": None, "cpu_s": s} for t, s in cpu_by_title.items()]


def verdict(fig):
    problems = [f"step {name} {step['state']}" for name, step in fig["steps"].items() if step["state"] != "done"]
    if fig.get("tests") and (fig["tests"]["counts"]["failed"] or fig["tests"]["counts"]["error"]):
        problems.append("CUDA tests failed")
    if any(not k["ok"] for k in fig.get("kernels") or []):
        problems.append("CUDA kernels differ from the CPU kernels")
    nccl = fig.get("nccl")
    if nccl and (nccl["one_gpu"]["status"] or nccl["gpu_0_0"]["status"] == 0 or nccl["gpu_0_0"]["stderr_lines"] != 1
                 or any(r["status"] == 124 or (r["status"] and (r["traceback"] or not r["last_line"]))
                        for r in nccl["two_ranks_one_gpu"])):
        problems.append("the NCCL path neither ran nor refused in one line")
    return "all good" if not problems else "; ".join(problems)


def write_outputs(out, fig):
    fig["verdict"] = verdict(fig)
    (out / "figures.json").write_text(json.dumps(fig, indent=1))
    (out / "report.txt").write_text(render_report(fig))


# ---- steps run in a fresh interpreter (after the install) ----------------------------------------------------
def run_step(name, result_path):
    if name == "kernels":
        value = check_kernels("cuda")
    elif name == "spn":
        value = spn_times("cuda")
    elif name == "nccl":
        value = nccl_checks()
    else:
        raise SystemExit(f"gpu_check: unknown step {name!r}")
    Path(result_path).write_text(json.dumps(value))


def check(out, bundle, no_install, budget):
    log = Log(out / "log.txt")
    fig = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget, "steps": {}}
    fig["environment"] = environment()
    log.progress(f"GPU {fig['environment']['gpu']} (sm_{fig['environment']['arch']}), torch "
                 f"{fig['environment']['torch']}, {fig['environment']['nvcc_version'] or 'no nvcc'}; budget {budget:.0f} s")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    order = [s for s in STEPS if not (no_install and s == "install")]
    for i, name in enumerate(order, 1):
        most, least = STEPS[name]
        left = budget - log.elapsed() - 5  # a few seconds kept for the report
        if left < least:
            fig["steps"][name] = {"state": "skipped", "note": f"{left:.0f} s of the budget left, it needs {least}"}
            log.progress(f"step {i}/{len(order)} {name}: skipped (budget)")
            continue
        timeout = min(most, left)
        log.progress(f"step {i}/{len(order)} {name} (at most {timeout:.0f} s)")
        start, note, state = time.monotonic(), None, "done"
        if name == "install":
            fig["install"] = install(fig["environment"], bundle, log, timeout)
            if not fig["install"]["ok"]:
                state, note = "failed", fig["install"]["why"]
        elif name == "tests":
            fig["tests"] = run_tests(out, log, timeout)
            c = fig["tests"]["counts"]
            note = f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
            if fig["tests"]["status"] == 124:
                state = "timeout"
        elif name in ("bench_cuda", "bench_cpu"):
            args = (["--device", "cuda", "--repeat", "3"] if name == "bench_cuda"
                    else ["--device", "cpu", "--skip-nets", "--no-reference", "--repeat", "2"])
            status, _ = run_command(_python("benchmarks/bench_native.py", *args, "--json", str(tmp / f"{name}.json")),
                                    log, timeout, _step_env())
            if status:
                state, note = ("timeout" if status == 124 else "failed"), f"status {status}"
            else:
                fig[name] = json.loads((tmp / f"{name}.json").read_text())
        else:
            result = tmp / f"{name}.json"
            status, lines = run_command(_python(str(Path(__file__).resolve()), "--step", name, "--result", str(result)),
                                        log, timeout, _step_env())
            if status or not result.exists():
                state, note = ("timeout" if status == 124 else "failed"), f"status {status}: {lines[-1] if lines else ''}"
            else:
                fig[name] = json.loads(result.read_text())
        if name == "kernels" and fig.get("kernels"):
            note = f"{sum(k['ok'] for k in fig['kernels'])} of {len(fig['kernels'])} within tolerance"
        fig["steps"][name] = {"state": state, "seconds": time.monotonic() - start, "note": note}
        log.progress(f"step {i}/{len(order)} {name}: {state}" + (f" ({note})" if note else ""))
        if name == "install" and state != "done":
            break  # nothing after it can run
        if "bench_cuda" in fig or "bench_cpu" in fig:
            fig["ops"] = merge_ops(fig.get("bench_cuda"), fig.get("bench_cpu"))
            fig["nets"] = (fig.get("bench_cuda") or {}).get("nets", [])
        fig["elapsed_s"] = log.elapsed()
        write_outputs(out, fig)  # a report after every step, should the machine go away
    fig["elapsed_s"] = log.elapsed()
    write_outputs(out, fig)
    shutil.rmtree(tmp, ignore_errors=True)
    log.progress(f"done in {log.elapsed():.0f} s: {fig['verdict']}; report in {out / 'report.txt'}")
    return 0 if fig["verdict"] == "all good" else 1


# ---- --prepare: the offline bundle ---------------------------------------------------------------------------
def prepare(folder, python_version="3.12"):
    """DIR/wheels (the BUNDLE_PACKAGES at the versions installed here, for CPython `python_version` on
    manylinux x86-64) and DIR/shared (a copy of ../shared)."""
    from importlib import metadata

    if folder.exists() and any(folder.iterdir()):
        raise Refusal(f"gpu_check: --prepare {folder}: the folder exists and is not empty; give a new one")
    try:
        pins = [f"{name}=={metadata.version(name)}" for name in BUNDLE_PACKAGES]
    except metadata.PackageNotFoundError as err:
        raise Refusal(f"gpu_check: --prepare: {err.name} is not installed here, so its version is unknown "
                      f"(pip install -e '.[test]' first)") from None
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                             "manylinux2014_x86_64", "manylinux1_x86_64")]
    for pin in pins:
        cmd = _python("-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"--python-version={python_version}",
                      "--implementation=cp", *platforms, "-d", str(folder / "wheels"), pin)
        if subprocess.run(cmd).returncode:
            raise Refusal(f"gpu_check: --prepare: pip download {pin} failed (see above)")
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        shutil.copytree(shared, folder / "shared")
    print(f"gpu_check: {folder}: {', '.join(pins)}" + (f"; {shared} copied" if shared.is_dir() else
                                                     f"; no {shared} to copy (tests reading it will fail)"))
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="folder for report.txt, figures.json, log.txt, junit.xml")
    ap.add_argument("--bundle", type=Path, help="folder made by --prepare: offline wheels and ../shared")
    ap.add_argument("--no-install", action="store_true", help="the project is installed already (CUDA module built)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check (default 450)")
    ap.add_argument("--prepare", type=Path, metavar="DIR", help="make the offline bundle in DIR, then stop")
    ap.add_argument("--python", default="3.12", help="--prepare: the GPU machine's Python version (default 3.12)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return args
    if args.prepare is not None:
        if args.out is not None or args.bundle is not None:
            ap.error("--prepare takes no OUT_DIR or --bundle")
        return args
    if args.out is None:
        ap.error("give OUT_DIR (the folder for the report), or --prepare DIR")
    if args.budget < 60:
        ap.error(f"--budget {args.budget:g}: at least 60 seconds")
    if args.bundle is not None and not (args.bundle / "wheels").is_dir():
        ap.error(f"--bundle {args.bundle}: no wheels/ folder in it (make it with --prepare)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.step:
            run_step(args.step, args.result)
            return 0
        if args.prepare is not None:
            return prepare(args.prepare, args.python)
        problem = gpu_problem()
        if problem:
            raise Refusal(f"gpu_check: {problem}; it needs a machine with an NVIDIA GPU")
        taken = [name for name in OUTPUTS if (args.out / name).exists()]
        if taken:
            raise Refusal(f"gpu_check: {args.out / taken[0]} exists; give an empty or new folder")
        args.out.mkdir(parents=True, exist_ok=True)
        return check(args.out, args.bundle, args.no_install, args.budget)
    except Refusal as refusal:
        print(refusal.line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
