"""tools/gpu_check.py where there is no GPU: its refusal, arguments, report, test-outcome reading, and its
kernel comparison run on CPU tensors with the emulated CUDA kernels against the CPU kernels."""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_layers import native
from golden import OnStreamZero

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _run_script(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, on any machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_refuses_in_one_line_without_a_gpu(tmp_path):
    done = _run_script(str(tmp_path / "out"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and "it needs a machine with an NVIDIA GPU" in lines[0]
    assert done.stdout == "" and not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("args,message", [
    ([], "give OUT_DIR"), (["o", "--budget", "30"], "at least 60 seconds"),
    (["o", "--bundle", "nowhere"], "no wheels/ folder"), (["o", "--prepare", "p"], "--prepare takes no OUT_DIR")])
def test_bad_arguments_are_one_clear_error(args, message):
    done = _run_script(*args)
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1]


def test_prepare_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    done = _run_script("--prepare", str(tmp_path))
    assert done.returncode == 2 and "exists and is not empty" in done.stderr
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_an_earlier_report_is_never_overwritten(tmp_path, monkeypatch):
    (tmp_path / "report.txt").write_text("an earlier run")
    monkeypatch.setattr(gpu_check, "gpu_problem", lambda: None)
    assert gpu_check.main([str(tmp_path)]) == 2
    assert (tmp_path / "report.txt").read_text() == "an earlier run"


def test_junit_outcomes(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_good():\n    pass\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs a GPU')\ndef test_gpu():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'j.xml'}",
                    str(tmp_path / "test_some.py")], capture_output=True, cwd=tmp_path)
    got = {o["test"].rsplit("::", 1)[1]: (o["outcome"], o["message"]) for o in gpu_check.junit_outcomes(tmp_path / "j.xml")}
    assert got["test_good"] == ("passed", "")
    assert got["test_bad"][0] == "failed" and "one is not two" in got["test_bad"][1]
    assert got["test_gpu"] == ("skipped", "needs a GPU")


@contextlib.contextmanager
def _cpu_module(module):
    """native's CPU tensors run `module`'s kernels inside the block."""
    native.available("cpu")
    real = native._modules["cpu"]
    native._modules["cpu"] = module
    try:
        yield
    finally:
        native._modules["cpu"] = real


def test_kernel_check_passes_the_emulated_cuda_kernels(emulated_cuda):
    results = gpu_check.check_kernels("cpu", lambda: _cpu_module(OnStreamZero(emulated_cuda)), small=True)
    names = {r["kernel"] for r in results}
    assert len(results) == 2 * len(names) and {r["dtype"] for r in results} == {"float64", "float32"}
    for word in ("im2dist", "im2parity", "spn three-way", "spn one-way", "seg-aware conv", "norm conv"):
        assert any(word in n for n in names), word
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert all(r["outputs"] >= 2 for r in results if "im2parity" not in r["kernel"])  # the backward was compared


class _WrongDirection(OnStreamZero):
    """The emulated kernels with the SPN forward scanning the other way: the check must name those cases."""

    def __getattr__(self, name):
        if name == "spn_forward":
            return lambda d, x, g1, g2, g3, h, planes, H, W, hz, rv: self.module.spn_forward(
                d, x, g1, g2, g3, h, planes, H, W, hz, not rv, 0)
        return super().__getattr__(name)


def test_kernel_check_names_a_kernel_that_differs(emulated_cuda):
    results = gpu_check.check_kernels("cpu", lambda: _cpu_module(_WrongDirection(emulated_cuda)), small=True)
    bad = {r["kernel"] for r in results if not r["ok"]}
    assert bad == {r["kernel"] for r in results if r["kernel"].startswith("spn")}
    text = gpu_check.render_report({"steps": {}, "kernels": results})
    assert "BAD spn three-way left->right" in text and "ok  im2dist" in text


def _figures():
    step = {"state": "done", "seconds": 1.0, "note": None}
    return {
        "started": "2026-12-01 10:00:00 UTC", "budget_s": 300, "elapsed_s": 250.0,
        "environment": {"gpu": "NVIDIA H200", "arch": "90", "torch": "2.11.0+cu130"},
        "steps": {name: dict(step) for name in gpu_check.STEPS},
        "install": {"archs": "90", "build_s": 40.0, "ok": True, "why": None},
        "tests": {"status": 0, "counts": {"passed": 2, "failed": 0, "error": 0, "skipped": 0}, "summary": "",
                  "tests": [{"test": "tests.test_spn::test_scan_cuda_matches_cpu[d0]", "outcome": "passed", "message": ""},
                            {"test": "tests.test_weights::test_load_into_cuda_net", "outcome": "passed", "message": ""}]},
        "kernels": [{"kernel": "im2dist L1", "dtype": "float32", "outputs": 2, "max_abs": 1e-6, "error": 1e-7, "ok": True}],
        "ops": gpu_check.merge_ops(
            {"ops": [{"title": "SPN scan", "native_s": 0.001, "native_peak_bytes": 2**20, "reference_s": 0.05,
                      "reference_peak_bytes": 2**21}]},
            {"ops": [{"title": "SPN scan", "native_s": 0.02}, {"title": "CPU only", "native_s": 0.5}]}),
        "spn": [{"shape": [1, 32, 64, 64], "direction": "left->right", "native_forward_s": 5e-5,
                 "native_forward_backward_s": 2e-4, "reference_forward_s": 0.01, "reference_forward_backward_s": 0.03,
                 "cpu_native_forward_s": 0.002, "cpu_native_forward_backward_s": 0.006}],
        "nets": [{"net": "vgg", "variant": "native + fused", "forward_s": 0.012, "peak_bytes": 2**30,
                  "inputs": {"data": [1, 3, 321, 321]}}],
        "nccl": {"one_gpu": {"status": 0, "losses": ["1.5", "0.2"], "last_line": ""},
                 "gpu_0_0": {"status": 1, "stderr_lines": 1, "last_line": "--gpu 0,0: GPU 0 named twice; ..."},
                 "two_ranks_one_gpu": [{"rank": r, "status": 1, "losses": [], "traceback": False,
                                        "last_line": f"rank {r}: torch.distributed (nccl) refused to start on cuda:0: "
                                                     f"Duplicate GPU detected"} for r in (0, 1)]},
    }


def test_report_and_figures_are_written(tmp_path):
    fig = _figures()
    gpu_check.write_outputs(tmp_path, fig)
    assert json.loads((tmp_path / "figures.json").read_text())["verdict"] == "all good"
    text = (tmp_path / "report.txt").read_text()
    assert text.startswith("caffe_layers GPU check (2026-12-01 10:00:00 UTC), 250 s of a 300 s budget; verdict: all good")
    assert "== CUDA tests (pytest -m gpu): 2 passed, 0 failed, 0 errors, 0 skipped" in text
    assert "  passed  tests.test_weights::test_load_into_cuda_net" in text
    spn_row = [line for line in text.splitlines() if line.startswith("  32x64x64")][0].split()
    assert spn_row[:4] == ["32x64x64", "left->right", "0.050", "0.200"]
    op_row = [line for line in text.splitlines() if line.startswith("  SPN scan")][0].split()
    assert op_row[-5:] == ["1.000", "50.000", "20.000", "50.0x", "20.0x"]
    assert [line for line in text.splitlines() if line.startswith("  CPU only")][0].split()[-5:] == \
        ["-", "-", "500.000", "-", "-"]
    assert "vgg deploy native + fused" in text and "12.0 ms" in text
    assert "rank 1: status 1; rank 1: torch.distributed (nccl) refused" in text


@pytest.mark.parametrize("change,problem", [
    (lambda f: f["tests"]["counts"].update(failed=1), "CUDA tests failed"),
    (lambda f: f["kernels"][0].update(ok=False), "CUDA kernels differ"),
    (lambda f: f["steps"]["spn"].update(state="skipped"), "step spn skipped"),
    (lambda f: f["nccl"]["gpu_0_0"].update(stderr_lines=30), "NCCL path"),
    (lambda f: f["nccl"]["two_ranks_one_gpu"][0].update(traceback=True), "NCCL path"),
    (lambda f: f["nccl"]["two_ranks_one_gpu"][1].update(status=124, last_line="(ended after 60 s: it hung)"),
     "NCCL path")])
def test_verdict_names_each_problem(change, problem):
    fig = _figures()
    change(fig)
    assert problem in gpu_check.verdict(fig)


def test_check_runs_each_step_reports_after_each_and_skips_past_the_budget(tmp_path, monkeypatch):
    """The orchestration with the GPU parts stood in for: every step's command, its results in figures.json
    and report.txt, and a step that needs more time than is left named as skipped."""
    fig = _figures()
    monkeypatch.setattr(gpu_check, "environment", lambda: dict(fig["environment"], nvcc="/usr/bin/nvcc",
                                                               nvcc_version="release 13.0"))
    monkeypatch.setattr(gpu_check, "install", lambda *a: fig["install"])
    monkeypatch.setitem(gpu_check.STEPS, "bench_cpu", (120, 10**6))  # never enough time left
    commands = []

    def fake_run(cmd, log, timeout, env=None, cwd=None):
        commands.append(cmd[1:])
        if "--step" in cmd:
            step = cmd[cmd.index("--step") + 1]
            Path(cmd[cmd.index("--result") + 1]).write_text(json.dumps(fig[step]))
        elif "--json" in cmd:
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"ops": [
                {"title": "SPN scan", "native_s": 0.001, "native_peak_bytes": 1, "reference_s": 0.05,
                 "reference_peak_bytes": 2}], "nets": fig["nets"]}))
        else:  # pytest
            junit = [a for a in cmd if a.startswith("--junitxml=")][0].split("=", 1)[1]
            Path(junit).write_text('<testsuites><testsuite><testcase classname="tests.test_spn" '
                                   'name="test_scan_cuda_matches_cpu[d0]"/></testsuite></testsuites>')
        log.output("ran " + " ".join(cmd[1:3]))
        return 0, ["ok"]

    monkeypatch.setattr(gpu_check, "run_command", fake_run)
    assert gpu_check.check(tmp_path, None, False, 300) == 1  # bench_cpu skipped: not all good
    assert [c[0] for c in commands] == [str(SCRIPT), "-m", str(SCRIPT), "benchmarks/bench_native.py", str(SCRIPT)]
    assert commands[1][:5] == ["-m", "pytest", "-q", "-m", "gpu"]
    assert [commands[i][2] for i in (0, 2, 4)] == ["kernels", "spn", "nccl"]
    assert commands[3][1:3] == ["--device", "cuda"]
    saved = json.loads((tmp_path / "figures.json").read_text())
    assert saved["verdict"] == "step bench_cpu skipped"
    assert saved["tests"]["counts"]["passed"] == 1 and saved["kernels"] == fig["kernels"]
    assert saved["ops"][0]["cuda_s"] == 0.001 and saved["ops"][0]["cpu_s"] is None
    text = (tmp_path / "report.txt").read_text()
    assert "  bench_cpu   skipped" in text and "it needs 1000000" in text
    assert "passed  tests.test_spn::test_scan_cuda_matches_cpu[d0]" in text
    log = (tmp_path / "log.txt").read_text()
    assert "step 7/7 bench_cpu: skipped (budget)" in log and "ran -m pytest" in log


def test_nccl_checks_without_a_gpu_refuse_and_the_torchrun_path_trains_on_gloo(monkeypatch, tmp_path):
    """The training commands the NCCL step runs, here with no GPU: --gpu 0 and --gpu 0,0 refuse in one line;
    the two torchrun-style ranks get gloo on the CPU (no GPU to put NCCL on) and both train."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CAFFE_LAYERS_CPU_FALLBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    got = gpu_check.nccl_checks(timeout=240)
    assert list(tmp_path.iterdir()) == []  # the snapshots stayed in the step's own folder
    assert got["one_gpu"]["status"] == 1 and got["one_gpu"]["last_line"].startswith("--gpu 0: no CUDA device is available to torch")
    assert got["gpu_0_0"]["status"] == 1 and got["gpu_0_0"]["stderr_lines"] == 1
    assert got["gpu_0_0"]["last_line"].startswith("--gpu 0,0: GPU 0 named twice")
    for rank in got["two_ranks_one_gpu"]:
        assert rank["status"] == 0 and not rank["traceback"], rank
    assert got["two_ranks_one_gpu"][0]["losses"]  # rank 0 logs the loss
