"""Small shared helpers: the user-facing error type, device and seeding, logging, checkpoints."""
import functools
import importlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch

LOG = logging.getLogger("admm_at")


class UserError(Exception):
    """A problem with the user's input (config, paths, files). Entry scripts print it as one
    line, ``error: <message>``, and exit with status 2, without a traceback."""


def run_cli(main, *args):
    """Run a command-line entry point: a ``UserError``, or an ``OSError`` on a file, ends it with
    one line on stderr (``error: ...``) and exit status 2 instead of a traceback."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
    sys.exit(2)


def progress(iterable, total, desc):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, CI, batch jobs)."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def get_device(name):
    """``auto`` -> cuda if available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device: {name!r} is not a device ({e}); use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available; use device=auto or cpu")
    return dev


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(log_file=None, enabled=True):
    """Log to the console and, if given, append to ``log_file``. Safe to call more than once.
    ``enabled=False`` (torchrun ranks other than 0) drops every message."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    if not enabled:
        LOG.addHandler(logging.NullHandler())
        return LOG
    # Progress rows go to stdout, warnings and errors to stderr.
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(h)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOG.addHandler(fh)
    return LOG


@functools.lru_cache(maxsize=None)
def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(obj, path):
    """Write ``obj`` with ``torch.save``, atomically (``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """Call ``write(f)`` on a temp file in the same folder, fsync, then rename it over ``path``.
    A crash mid-save leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is as readable as any file the user writes
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def require(module, purpose, install):
    """``import module`` for an optional feature; without it, a one-line ``UserError``: ``purpose``
    needs ``install`` (what to pip install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {install}: pip install {install}") from None


def rng_state():
    """RNG states of python, numpy and torch (CPU and CUDA) as plain data and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_file(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so a file that would
    run code is refused. Any failure is a one-line ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning would add lines to the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in reason:  # torch's text goes on to suggest weights_only=False: don't
            reason = "it holds objects other than tensors and plain data, and loading it could run code"
        raise UserError(f"cannot load checkpoint {path}: not a valid weights-only checkpoint "
                        f"(truncated, corrupt, or containing code) - {reason[:200]}") from None


def load_checkpoint(path, map_location="cpu"):
    """A training checkpoint (see ``load_file``), checked to be one written by this project."""
    ckpt = load_file(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (no 'model'/'config' entries)")
    return ckpt
