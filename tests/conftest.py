"""Shared pytest setup: import the project's modules from the repo root, keep torch small and seeded."""
import os
import sys

# Subprocesses (the scripts run as a user runs them) inherit this: one intra-op thread each, so
# pytest-xdist's workers (requirements-dev.txt, -n 2 in pytest.ini) share the cores without
# OpenMP threads spin-waiting for each other. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
