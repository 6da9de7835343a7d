"""The run folder's files and their rules, in one place for the entry scripts and the experiment
driver (``experiments/sweep.py``):

    <stage>.pt          a finished stage's checkpoint; the next stage starts from it
    <stage>.last.pt     the running stage's latest state (``--resume`` continues from it);
                        removed when ``<stage>.pt`` is written
    .tmp-<name>-*       a save of <name> in progress (atomic saves); left only by a killed save,
                        removed at start
    .lock               held (``fcntl.flock``) by the run that owns the folder; names its PID and host
    config.yaml         the resolved config
    log.txt             the appended human-readable log
    metrics.jsonl       one JSON object per epoch ("kind": "epoch") and per stage update ("kind":
                        "update", e.g. ADMM's Z/U), for plotting without parsing log.txt
    eval.json           the final model's report after a full run

A folder has one owner at a time (``locked``), and every file in it is written whole or not at
all: checkpoints, config.yaml and eval.json through ``common.atomic_write``, a metrics.jsonl row
by an append that is undone if it fails, so the file always parses line by line. A write that
fails (a full disk) ends the run with ``write_failed``'s one line.
"""
import contextlib
import datetime
import fcntl
import json
import math
import os
import socket

from common import WRITE_ERRORS, UserError, atomic_write, describe_os_error, save_checkpoint


class RunFolder:
    def __init__(self, path):
        self.path = path
        self.complete = None  # the newest complete checkpoint of this run (path), for write_failed

    # ----------------------------------------------------------------------- one owner at a time

    @contextlib.contextmanager
    def locked(self):
        """Own the folder while the block runs: an exclusive ``fcntl.flock`` on ``.lock``, which
        the OS drops when the process ends however it ends (``kill -9`` included), so a lock is
        never stale and ``--resume`` after a crash takes it as usual. Another run holding it is a
        ``UserError`` naming its PID and host, raised before anything in the folder is touched.
        Creates the folder."""
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror}; choose another --out") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "owner unknown"
                raise UserError(f"{self.path} is in use by another run ({owner}); wait for it to end, "
                                f"or choose another --out") from None
            try:  # who owns it, for the message above; best effort (a full disk must not stop the run here)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}, since "
                              f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
            except OSError:
                pass
            yield self
        finally:
            os.close(fd)  # releases the lock

    # ----------------------------------------------------------------------- checkpoints

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

    def save(self, obj, path):
        """Write checkpoint ``obj`` to ``path`` (atomically) and remember it as the run's newest
        complete checkpoint."""
        save_checkpoint(obj, path)
        self.complete = path

    def write_text(self, name, text):
        """The file ``name`` of the folder with ``text``, written whole or not at all."""
        atomic_write(self.file(name), lambda f: f.write(text), binary=False)

    def write_failed(self, error, stages, resume, rerun):
        """The one line that ends a run of ``stages`` whose write failed with ``error`` (an
        ``OSError`` naming the file): which file and why, the newest complete checkpoint, which is
        intact, and the command that continues the run: ``resume`` when the folder holds a
        checkpoint of ``stages`` to resume, else ``rerun``."""
        what, fix = describe_os_error(error), WRITE_ERRORS.get(error.errno, "fix the cause")
        again = resume if self.existing(stages) else rerun
        if self.complete:
            return f"{what}; the last complete checkpoint, {self.complete}, is intact; {fix} and continue with: {again}"
        return f"{what}; no checkpoint of this run was written yet; {fix} and start it again with: {again}"

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
        """Append ``row`` (a dict of numbers and strings; NaN is written as null) as one line. A
        failed write (a full disk) is undone, so no half row is left: the file stays parseable."""
        size = self.metrics_bytes()
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(_no_nan(row)) + "\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.metrics, size)  # frees space, never needs it
            raise OSError(e.errno, e.strerror, self.metrics) from None

    def truncate_metrics(self, nbytes):
        """Drop the rows written after a checkpoint that holds ``nbytes`` (the resumed run writes
        them again), so each epoch appears once."""
        if nbytes is not None and self.metrics_bytes() > nbytes:
            with open(self.metrics, "r+") as f:
                f.truncate(nbytes)

    def drop_metrics(self, stages):
        """Drop the rows of ``stages`` (names): a stage that starts afresh writes its own rows.
        The file is rewritten whole or not at all."""
        if os.path.isfile(self.metrics):
            with open(self.metrics) as f:
                keep = [line for line in f if json.loads(line).get("stage") not in stages]
            atomic_write(self.metrics, lambda f: f.writelines(keep), binary=False)


def _no_nan(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    return v
