import sys
from pathlib import Path

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
