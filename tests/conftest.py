import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A skip may only mean "this machine has no GPU": any other reason (a missing package, a missing
# ../shared) would hide a broken install, so it fails the run (issue 13).
_GPU_WORDS = ("CUDA", "GPU")
_bad_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(word in reason for word in _GPU_WORDS):
            _bad_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips:
        print("\nskipped for a reason other than a missing GPU (install what the tests need):\n  "
              + "\n  ".join(_bad_skips))
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """`-m gpu` selects the tests that need a GPU (a skipif whose reason names CUDA or a GPU), as
    tools/gpu_check.py runs them; here they are the only skips allowed."""
    for item in items:
        if any(any(word in str(m.kwargs.get("reason", "")) for word in _GPU_WORDS) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """cuda/native_cuda.cu compiled by the host C++ compiler with cuda/cuda_emulation.h: a launch runs its
    grid's threads one after another, or, for kernels with barriers, a block's threads as std::threads."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sysconfig

    import pybind11

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    assert cxx is not None, "no C++ compiler (CXX or c++) to build the emulated CUDA kernels"
    src = Path(__file__).resolve().parents[1] / "cuda"
    out = tmp_path_factory.mktemp("cuda_emulation") / "_native_cuda.so"
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-DCL_CUDA_HOST_EMULATION", f"-I{src}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", "-x", "c++",
           str(src / "native_cuda.cu"), str(src / "bind_cuda.cpp"), "-o", str(out)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"building the emulated CUDA kernels failed:\n{built.stderr[-3000:]}"
    spec = importlib.util.spec_from_file_location("_native_cuda", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
