"""Natural training + ADMM pruning: ``python main.py --config configs/demo.yaml`` (see engine.py)."""
import os

# Before torch starts its OpenMP threads: let idle threads sleep instead of spin-waiting. On a
# busy CPU, spinning threads slowed a demo epoch 20x (119 s vs 6.6 s); set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

from training import rundir  # noqa: E402

rundir.exit_if_busy(sys.argv[1:])  # before torch loads (seconds): a second run on a folder stops at once
from training.command import run  # noqa: E402

if __name__ == "__main__":
    run(adversarial=False)
