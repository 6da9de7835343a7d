"""Natural training + ADMM pruning: ``python main.py --config configs/demo.yaml`` (see training/command.py)."""
import sys

import common  # noqa: F401 - first: the commands' preamble (common.py)
from training import rundir

rundir.exit_if_busy(sys.argv[1:])  # before torch loads: a second run on a folder stops at once
from training.command import run  # noqa: E402

if __name__ == "__main__":
    run(adversarial=False)
