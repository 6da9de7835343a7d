"""Shared pytest setup: import the project's modules from the repo root, keep torch small and seeded."""
import os
import sys

# This process's OpenMP pool, set before torch is imported: one intra-op thread, so pytest-xdist's
# workers (requirements-dev.txt, -n 2 in pytest.ini) share the cores without OpenMP threads
# spin-waiting for each other. The scripts a test starts do not rely on it: they get
# helpers.script_env(), which sets their thread count explicitly, whatever the caller exported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# The fuzz tests (test_fuzz.py): in CI a fixed budget and fixed seeds (derandomize), so the suite
# is repeatable and its share small; by hand a long random run:
#   HYPOTHESIS_PROFILE=long python -m pytest -n0 tests/test_fuzz.py --hypothesis-show-statistics
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, database=None)
settings.register_profile("long", max_examples=5000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The unit tests use tiny tensors, where intra-op threads cost far more than they save: on a busy
# 2-core machine a LeNet step took ~0.27 s with 2 threads and ~0.002 s with 1 (OpenMP threads
# spin-wait for a core). One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so random tensors (and failures) reproduce."""
    torch.manual_seed(0)
    yield


# The docs test's closing count (tests/test_docs.py, test_zz_counts), printed once at the end of
# the session, also when the tests ran on pytest-xdist workers (the property travels with the report).
_DOCS_COUNTS = []


def pytest_runtest_logreport(report):
    _DOCS_COUNTS.extend(v for k, v in report.user_properties if k == "docs_counts" and report.when == "call")


def pytest_terminal_summary(terminalreporter):
    for line in _DOCS_COUNTS:
        terminalreporter.write_line(line)
