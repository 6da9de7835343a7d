"""The run folder's files and their rules, in one place for the entry scripts and the experiment
driver (``experiments/sweep.py``):

    <stage>.pt          a finished stage's checkpoint; the next stage starts from it
    <stage>.last.pt     the running stage's latest state (``--resume`` continues from it);
                        removed when ``<stage>.pt`` is written
    .tmp-*              a save in progress (atomic saves); left only by a killed save, removed at start
    config.yaml         the resolved config
    log.txt             the appended human-readable log
    metrics.jsonl       one JSON object per epoch ("kind": "epoch") and per stage update ("kind":
                        "update", e.g. ADMM's Z/U), for plotting without parsing log.txt
    eval.json           the final model's report after a full run
"""
import json
import math
import os


class RunFolder:
    def __init__(self, path, mirror=None):
        """``mirror``: an object whose ``add(row)`` gets every row appended to metrics.jsonl too
        (``tblog.TensorBoardLog``), so the two cannot drift apart."""
        self.path = path
        self.mirror = mirror

    def file(self, name):
        return os.path.join(self.path, name)

    def final(self, stage):
        return self.file(f"{stage}.pt")

    def last(self, stage):
        return self.file(f"{stage}.last.pt")

    def status(self, stage):
        """"done" (``<stage>.pt`` exists), "partial" (only ``<stage>.last.pt``: resume it) or "new"."""
        if os.path.isfile(self.final(stage)):
            return "done"
        return "partial" if os.path.isfile(self.last(stage)) else "new"

    def existing(self, stages):
        """The checkpoint files of ``stages`` present in the folder (names, not paths)."""
        return [f for s in stages for f in (f"{s}.pt", f"{s}.last.pt") if os.path.isfile(self.file(f))]

    def remove_temp(self):
        """Remove the temp files of saves that were killed (the checkpoint they replaced is intact)."""
        for f in os.listdir(self.path):
            if f.startswith(".tmp-"):
                os.remove(self.file(f))

    # ----------------------------------------------------------------------- metrics.jsonl

    @property
    def metrics(self):
        return self.file("metrics.jsonl")

    def metrics_bytes(self):
        return os.path.getsize(self.metrics) if os.path.isfile(self.metrics) else 0

    def append_metrics(self, row):
        """Append ``row`` (a dict of numbers and strings; NaN is written as null) as one line."""
        row = _no_nan(row)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.mirror:
            self.mirror.add(row)

    def truncate_metrics(self, nbytes):
        """Drop the rows written after a checkpoint that holds ``nbytes`` (the resumed run writes
        them again), so each epoch appears once."""
        if nbytes is not None and self.metrics_bytes() > nbytes:
            with open(self.metrics, "r+") as f:
                f.truncate(nbytes)


    def drop_metrics(self, stages):
        """Drop the rows of ``stages`` (names): a stage that starts afresh writes its own rows."""
        if os.path.isfile(self.metrics):
            with open(self.metrics) as f:
                keep = [line for line in f if json.loads(line).get("stage") not in stages]
            with open(self.metrics, "w") as f:
                f.writelines(keep)


def _no_nan(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    return v
