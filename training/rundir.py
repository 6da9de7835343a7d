"""The run folder's files and their rules, in one place for the entry scripts and the experiment
driver (``experiments/sweep.py``):

    <stage>.pt          a finished stage's checkpoint; the next stage starts from it
    <stage>.last.pt     the running stage's latest state (``--resume`` continues from it);
                        removed when ``<stage>.pt`` is written
    .tmp-<name>-*       a save of <name> in progress (atomic saves); left only by a killed save,
                        removed at start
    .lock               held (``filelock``: flock on Unix, msvcrt on Windows) by the run that owns
                        the folder; names its PID and host
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
import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import sys

import filelock

# This module imports ``common`` (and with it torch) only inside the methods that write: the entry
# scripts call ``exit_if_busy`` before torch is imported, which takes seconds on a busy machine,
# so that a second run on a folder stops at once.


def default_out(config):
    """The run folder of a config when ``--out`` is not given: ``runs/<config file stem>``."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config))[0])


def exit_if_busy(argv):
    """Before anything heavy is imported: if the run folder of ``argv`` (``--out``, else the
    config's) is owned by another run, print the one-line error and exit with status 2. Ranks
    other than 0 of a torchrun launch skip it (rank 0 owns the folder). ``RunFolder.locked``
    makes the real claim later; this only answers early."""
    if os.environ.get("RANK", "0") != "0":
        return
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--out")
    args, _ = p.parse_known_args(argv)
    out = args.out or (default_out(args.config) if args.config else None)
    owner = RunFolder(out).owner() if out else None
    if owner:
        print(f"error: {busy(out, owner)}", file=sys.stderr)
        sys.exit(2)


def busy(path, owner):
    return f"{path} is in use by another run ({owner}); wait for it to end, or choose another --out"


class RunFolder:
    def __init__(self, path, mirror=None):
        """``mirror``: an object whose ``add(row)`` gets every row appended to metrics.jsonl too
        (``training.tensorboard.TensorBoardLog``), so the two cannot drift apart."""
        self.path = path
        self.mirror = mirror
        self.complete = None  # the newest complete checkpoint of this run (path), for write_failed

    # ----------------------------------------------------------------------- one owner at a time

    @contextlib.contextmanager
    def locked(self):
        """Own the folder while the block runs: an exclusive OS lock on ``.lock`` (``filelock``),
        which the OS drops when the process ends however it ends (``kill -9`` included), so a lock
        is never stale and ``--resume`` after a crash takes it as usual. Another run holding it is
        a ``UserError`` naming its PID and host, raised before anything in the folder is touched.
        Creates the folder."""
        from common import UserError
        lock = filelock.FileLock(self.file(".lock"), timeout=0.2)  # a moment's grace for ``owner`` probes
        try:
            os.makedirs(self.path, exist_ok=True)
            lock.acquire()
        except filelock.Timeout:
            raise UserError(busy(self.path, _owner_line(self.file(".lock")))) from None
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror}; choose another --out") from None
        try:
            try:  # who owns it, for the message above; best effort (a full disk must not stop the run here)
                with open(self.file(".lock"), "r+") as f:  # the lock is advisory on Unix: this fd may write
                    f.truncate(0)
                    f.write(f"PID {os.getpid()} on {socket.gethostname()}, since "
                            f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
            except OSError:
                pass
            yield self
        finally:
            lock.release()

    def owner(self):
        """Who owns the folder now ("PID 123 on host, since ..."), or None when no run does.
        Reads only; never creates the folder or its lock file."""
        path = self.file(".lock")
        if not os.path.isfile(path):
            return None
        probe = filelock.FileLock(path, timeout=0)
        try:
            probe.acquire()
        except filelock.Timeout:
            return _owner_line(path)
        except OSError:
            return None
        probe.release()
        return None

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
        from common import save_checkpoint
        save_checkpoint(obj, path)
        self.complete = path

    def write_text(self, name, text):
        """The file ``name`` of the folder with ``text``, written whole or not at all."""
        from common import atomic_write
        atomic_write(self.file(name), lambda f: f.write(text), binary=False)

    def write_failed(self, error, stages, resume, rerun):
        """The one line that ends a run of ``stages`` whose write failed with ``error`` (an
        ``OSError`` naming the file): which file and why, the newest complete checkpoint, which is
        intact, and the command that continues the run: ``resume`` when the folder holds a
        checkpoint of ``stages`` to resume, else ``rerun``."""
        from common import WRITE_ERRORS, describe_os_error
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
        row, size = _no_nan(row), self.metrics_bytes()
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.metrics, size)  # frees space, never needs it
            raise OSError(e.errno, e.strerror, self.metrics) from None
        if self.mirror:
            self.mirror.add(row)

    def truncate_metrics(self, nbytes):
        """Drop the rows written after a checkpoint that holds ``nbytes`` (the resumed run writes
        them again), so each epoch appears once."""
        if nbytes is not None and self.metrics_bytes() > nbytes:
            with open(self.metrics, "r+") as f:
                f.truncate(nbytes)

    def drop_metrics(self, stages):
        """Drop the rows of ``stages`` (names): a stage that starts afresh writes its own rows.
        The file is rewritten whole or not at all."""
        from common import atomic_write
        if os.path.isfile(self.metrics):
            keep = [json.dumps(row) + "\n" for row in self.read_metrics() if row.get("stage") not in stages]
            atomic_write(self.metrics, lambda f: f.writelines(keep), binary=False)

    def read_metrics(self, repair=True):
        """The rows of metrics.jsonl ([] if there is none), read strictly. A torn last line (a
        write cut off by a kill or a crash; ``append_metrics`` never leaves one itself) is
        dropped, with a warning, and with ``repair`` (the run that owns the folder) cut from the
        file too: the checkpoints hold the state, and a resumed stage writes its rows again. A
        reader that does not own the folder passes ``repair=False``: a live run's last line may
        be mid-write. Any other damaged line is a one-line ``UserError`` naming the file, the line
        and the fix."""
        from common import LOG, UserError
        if not os.path.isfile(self.metrics):
            return []
        with open(self.metrics, "rb") as f:
            lines = f.read().split(b"\n")
        rows, torn = [], lines.pop() != b""  # the text after the last newline: empty unless the line is torn
        for n, line in enumerate(lines, 1):
            row = _row(line)
            if row is None and n == len(lines) and not torn:
                torn = True  # the last line, ended, but cut: as good as torn
                break
            if row is None:
                raise UserError(f"{self.metrics} is damaged at line {n} (not a JSON object); move the file away "
                                f"(it is the run's log of figures; the checkpoints hold the state) and run again")
            rows.append(row)
        if torn:
            if repair:
                with open(self.metrics, "r+b") as f:
                    f.truncate(sum(len(line) + 1 for line in lines[:len(rows)]))
            LOG.warning(f"dropped the torn last line of {self.metrics} (a write cut off by a kill); {len(rows)} "
                        f"rows kept")
        return rows

    def read_config(self):
        """The run's config.yaml as a mapping (None if there is none), read as a config file is
        (``common.read_yaml``); damaged, it is one line naming the fix."""
        from common import UserError, read_yaml
        if not os.path.isfile(self.file("config.yaml")):
            return None
        try:
            return read_yaml(self.file("config.yaml"), "the run's config")
        except UserError as e:
            raise UserError(f"{e}; remove it to resume without comparing the configs (it is written again)") from None

    def read_checkpoint(self, path, device="cpu"):
        """This run's checkpoint at ``path`` (``common.load_checkpoint``); damaged, the one line
        also says how to go on without it."""
        from common import UserError, load_checkpoint
        try:
            return load_checkpoint(path, device)
        except UserError as e:
            stage = os.path.basename(path).split(".last.pt")[0].removesuffix(".pt")
            fix = (f"delete it to run stage {stage} again from its start" if path.endswith(".last.pt")
                   else f"delete it to run stage {stage} again")
            raise UserError(f"{e}; it is this run's own checkpoint: {fix} (with --resume), or start the run "
                            f"afresh with --overwrite") from None


def _owner_line(path):
    try:
        with open(path, errors="replace") as f:
            return f.read(512).strip() or "owner unknown"
    except OSError:  # Windows: the owner's byte-range lock keeps others from reading it
        return "owner unknown"


def _row(line):
    """One metrics.jsonl line as a dict, or None if it is not one."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _no_nan(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    return v
