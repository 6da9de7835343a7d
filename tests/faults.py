"""A disk that fills up, on demand, for the tests of write errors.

``full_disk(monkeypatch, name, skip=0, after=0, calls=1)`` replaces ``open``: the first
``skip`` times a file called ``name`` (or the temp file of its atomic save, ``.tmp-<name>-*``) is
opened for writing behave normally; from then on each such file takes ``calls - 1`` writes and
``after`` more bytes, and then fails with ENOSPC, as a write does when the disk fills up in the
middle of it (the bytes before the failure are on disk). ``calls`` counts ``write`` calls (a
log record is one), so a test can pick the line that fails whatever its paths' lengths. Every write of the project goes through ``open`` by name, so this reaches each
write site: checkpoints, metrics.jsonl, log.txt, config.yaml, eval.json, exports, plots.
"""
import builtins
import errno
import os


class _FillingFile:
    """A writable file that takes ``calls - 1`` writes and ``budget`` more bytes, then fails with ENOSPC."""

    def __init__(self, f, budget, calls):
        self._f, self._budget, self._calls = f, budget, calls

    def write(self, data):
        self._calls -= 1
        if self._calls > 0:
            return self._f.write(data)
        if len(data) <= self._budget:
            self._budget -= len(data)
            return self._f.write(data)
        self._f.write(data[:self._budget])
        self._f.flush()
        self._budget = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch, name, skip=0, after=0, calls=1):
    """Make writes to files called ``name`` fail as on a full disk (see the module docstring).
    Returns a dict whose "failed" counts the files that failed."""
    real_open, state = builtins.open, {"opened": 0, "failed": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        base = os.path.basename(str(file))
        if not any(c in mode for c in "wax") or not (base == name or base.startswith(f".tmp-{name}-")):
            return f
        state["opened"] += 1
        if state["opened"] <= skip:
            return f
        state["failed"] += 1
        return _FillingFile(f, after, calls)

    monkeypatch.setattr(builtins, "open", fake_open)
    return state
