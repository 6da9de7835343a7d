"""TensorBoard curves of a run: the rows of ``metrics.jsonl`` as scalars.

Live, with ``--tensorboard [DIR]`` on the training scripts: the run folder hands every row it
appends to metrics.jsonl to a ``TensorBoardLog`` as well (``rundir.RunFolder``'s ``mirror``), so the
curves and the file cannot drift apart. For a run folder written without it, ``tblog.py``:

    python tblog.py runs/demo [--logdir runs/demo/tensorboard]
    tensorboard --logdir runs/demo/tensorboard

Tags are ``<stage>/<figure>``, so TensorBoard shows one section per stage; the step is the passes
over the data within the stage (``passes``, rounded up to a whole pass: TensorBoard steps are
integers, so the free method's partial passes, or updates more often than once a pass, share a step):

    epoch rows   <stage>/loss, penalty, train_natural, train_adv, test_natural, test_pgd,
                 best_test_pgd, stage_gap, lr, time; <stage>/pruned_energy/<layer> of the
                 stage's hard prune (retrain) or latest magnitude prune (gradual)
    update rows  every figure of a Z/U update: <stage>/rho, <stage>/residual/<layer> (primal
                 ||W - Z|| / ||W||), <stage>/dual_residual/<layer>; gradual: fraction, pruned_energy/<layer>

A figure that is null in the row (NaN: no test this epoch, no residual before an update) is left out.
"""
import math
import os

from common import UserError, require
from training.rundir import RunFolder

EPOCH_SKIP = ("kind", "stage", "epoch", "passes", "convergence", "loss_fn", "beta")
UPDATE_SKIP = ("kind", "stage", "passes", "lr")  # the lr is the epoch row's


def scalars(row):
    """[(tag, value, step)] of one metrics.jsonl row ({"kind": "epoch" or "update", "stage",
    "passes", figures...}), as the module docstring lays them out."""
    stage, step = row["stage"], math.ceil(row["passes"])
    if row["kind"] == "epoch":
        figures = {k: v for k, v in row.items() if k not in EPOCH_SKIP}
        energy = ((row.get("convergence") or {}).get(stage) or {}).get("pruned_energy")
        if energy:
            figures["pruned_energy"] = energy
    else:
        figures = {k: v for k, v in row.items() if k not in UPDATE_SKIP}
    return [(f"{stage}/{name}", value, step) for name, value in _flat(figures)]


def _flat(figures, prefix=""):
    """(name, number) of the finite numbers in a nested dict, names joined with '/'."""
    for k, v in figures.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield f"{prefix}{k}", float(v)


class TensorBoardLog:
    """Writes metrics rows to TensorBoard event files in ``logdir`` (``torch.utils.tensorboard``,
    which needs the ``tensorboard`` package: without it, a one-line UserError)."""

    def __init__(self, logdir):
        tb = require("torch.utils.tensorboard", "--tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(logdir)

    def add(self, row):
        for tag, value, step in scalars(row):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a row per epoch or update: cheap, and the curves are live

    def close(self):
        self.writer.close()


def convert(run_folder, logdir):
    """Write the rows of ``run_folder``'s metrics.jsonl to ``logdir``; returns the number of rows."""
    path = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give a run folder written by main.py / adv_main.py")
    rows = RunFolder(run_folder).read_metrics(repair=False)  # a live run may be writing its last line
    log = TensorBoardLog(logdir)
    try:
        for row in rows:
            log.add(row)
    finally:
        log.close()
    return len(rows)
