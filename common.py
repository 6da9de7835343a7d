"""Small shared helpers: the user-facing error type, device and seeding, logging, checkpoints,
and files written whole or not at all."""
import argparse
import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import warnings
import zipfile

# The commands' one preamble. Idle OpenMP threads sleep instead of spin-waiting: on a busy CPU,
# spinning threads slowed a demo epoch many times over (docs/benchmarks.md). It must be set before
# torch loads its OpenMP runtime, so every command imports this module first, and this module
# imports torch and numpy only inside the functions that use them (a command can answer a busy
# run folder before torch loads). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LOG = logging.getLogger("admm_at")


class UserError(Exception):
    """A problem with the user's input (config, paths, files). Entry scripts print it as one
    line, ``error: <message>``, and exit with status 2, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse``'s parser whose errors (an unknown flag, ``--steps abc``) are a one-line
    ``UserError`` naming the flag, like every other bad input, instead of usage text and exit 2."""

    def error(self, message):
        one_line = message.replace("\n", "\\n").replace("\r", "\\r")  # argparse quotes the user's words raw
        raise UserError(f"{one_line} (see {self.prog} --help)")


def run_cli(main, *args):
    """Run a command-line entry point: a ``UserError``, or an ``OSError`` on a file, ends it with
    one line on stderr (``error: ...``) and exit status 2 instead of a traceback. The files the
    scripts write are written whole or not at all (``atomic_write``), so after a failed write
    there is nothing half-written to clean up: the command can simply be run again."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        again = "; nothing was left half-written: " + WRITE_ERRORS[e.errno] + " and run the command again" \
            if e.errno in WRITE_ERRORS else ""
        print(f"error: {describe_os_error(e)}{again}", file=sys.stderr)
    sys.exit(2)


# What to do about each error a write can end with (ENOSPC, EDQUOT, EROFS, EACCES, EPERM).
WRITE_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space under your quota",
                errno.EROFS: "use a writable file system", errno.EACCES: "make the folder writable",
                errno.EPERM: "make the folder writable"}


def describe_os_error(e):
    """One line for an ``OSError`` on a file: ``cannot write F: No space left on device (ENOSPC)``
    for the write errors of ``WRITE_ERRORS``, ``F: reason`` for any other."""
    code = errno.errorcode.get(e.errno, "")
    reason = f"{e.strerror or e}" + (f" ({code})" if code else "")
    return f"cannot write {e.filename}: {reason}" if e.errno in WRITE_ERRORS else f"{e.filename}: {reason}"


def progress(iterable, total, desc):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, CI, batch jobs)."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def get_device(name):
    """``auto`` -> cuda if available, else cpu; anything else is passed to ``torch.device``."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device: {name!r} is not a device ({e}); use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available; use device=auto or cpu")
    return dev


def set_deterministic(on):
    """``deterministic: true``: reproducible GPU runs. Torch's deterministic algorithms (an op
    without one is an error naming it), cuDNN's deterministic kernels without autotuning, and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS needs for reproducible matmuls (set here,
    before the first CUDA call, unless the user set it). Slower on GPU (docs/training.md); on CPU
    runs are reproducible anyway. Off: torch's defaults, left as they are."""
    import torch
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_everything(seed):
    import numpy as np
    import torch
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
        fh = _LogFile(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOG.addHandler(fh)
    return LOG


class _LogFile(logging.FileHandler):
    """The run's ``log.txt``. A failed write (a full disk) is not swallowed as ``logging`` does: it
    stops the run with an ``OSError`` naming the file, once; after that the handler stays quiet,
    so the run's closing error line still reaches the console."""

    def __init__(self, path):
        self.failed = False
        super().__init__(path)

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors)

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            return super().handleError(record)
        self.failed = True
        raise OSError(e.errno, e.strerror, self.baseFilename) from None


@functools.lru_cache(maxsize=None)
def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path, write, binary=True):
    """Write the file ``path`` whole or not at all: ``write(f)`` fills a temp file
    ``.tmp-<name>-XXXXXXXX`` in the same folder, which is fsynced and renamed over ``path``. A
    crash, a kill or a failed write (a full disk, a quota, a read-only or unwritable folder)
    leaves ``path`` as it was and, except after a kill, no temp file. An ``OSError`` of the write,
    however deep it was raised (``torch.save`` wraps it in a ``RuntimeError``), comes out as an
    ``OSError`` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the file is as readable as any the user writes
        with open(tmp, "wb" if binary else "w") as f:  # by name, like every write: see tests/faults.py
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        cause = _os_error(e)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror, path) from None
        raise


@functools.lru_cache(maxsize=None)
def strict_yaml_loader():
    """PyYAML's safe loader, except that a key written twice in one mapping, at any depth, is an
    error naming the key and both lines (a key a merge ``<<: *anchor`` brings in may be written again) (``safe_load`` keeps the last one silently, so two
    ``adv:`` sections would drop the first whole). Built on first use: ``yaml`` is imported only
    where YAML is read."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys give way to the ones here
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice, on lines {seen[key]} and {line}; keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: PyYAML's own error names it below
                    break
            self.flatten_mapping(node)  # merged keys first, the mapping's own after them (they win)
            return super().construct_mapping(node, deep)
    return Loader


def parse_yaml(text, name):
    """The YAML document ``text`` (from ``name``, for messages) with duplicate keys refused
    (``_StrictLoader``). Any failure is a one-line ``UserError`` naming ``name``."""
    import yaml
    try:
        return yaml.load(text, Loader=strict_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{name} is not valid YAML: {reason}") from None
    except RecursionError:
        raise UserError(f"{name} is not valid YAML: nested too deeply") from None


def read_yaml(path, what="config"):
    """The mapping in the YAML file ``path`` (a ``what``: named in messages), read strictly: a
    file that cannot be read, is not UTF-8 text, is empty, holds a key twice or holds something
    other than a mapping is a one-line ``UserError`` naming the file."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); "
                        f"give a YAML file") from None
    if "\x00" in text:
        raise UserError(f"{what} {path} is a binary file (it holds NUL bytes), not YAML; give a YAML file")
    data = parse_yaml(text, f"{what} {path}")
    if data is None:
        raise UserError(f"{what} {path} is empty (or holds only comments)")
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys (section: ...), not a {type(data).__name__}")
    return data


def require(module, purpose, install):
    """``import module`` for an optional feature; without it, a one-line ``UserError``: ``purpose``
    needs ``install`` (what to pip install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {install}: pip install {install}") from None


def _os_error(e):
    """The ``OSError`` that ``e`` is or was raised while handling (None if none)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save_checkpoint(obj, path):
    """``torch.save(obj)`` to ``path`` with ``atomic_write``: a crash mid-save leaves the previous
    file intact."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj):
    """``obj`` as indented JSON at ``path``, written with ``atomic_write``."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)


def rng_state():
    """RNG states of python, numpy and torch (CPU and CUDA) as plain data and tensors."""
    import numpy as np
    import torch
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    import numpy as np
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_file(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so a file that would
    run code is refused. The archive's CRC-32 checksums are checked first (``torch.load`` does not
    check them, and a flipped bit in a tensor would load as a silently different weight). Any
    failure is a one-line ``UserError``; a folder is answered with the checkpoints in it."""
    import torch
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".pt") and not f.startswith("."))
        raise UserError(f"{path} is a folder, not a checkpoint; give one of its files: "
                        + (", ".join(os.path.join(path, f) for f in found) if found else "it holds no .pt file"))
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")

    def refuse(reason):
        return UserError(f"cannot load checkpoint {path}: not a valid weights-only checkpoint "
                         f"(truncated, corrupt, or containing code) - {reason[:200]}")

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001 - zipfile raises many types for damaged archives
        raise refuse(f"not a readable zip archive ({type(e).__name__}: {str(e)[:100]})") from None
    if bad is not None:
        raise refuse(f"its entry {bad} fails its CRC-32 check (the file is damaged)")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning would add lines to the one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in reason:  # torch's text goes on to suggest weights_only=False: don't
            reason = "it holds objects other than tensors and plain data, and loading it could run code"
        raise refuse(reason) from None


@contextlib.contextmanager
def reading(path, what="checkpoint"):
    """While the contents of a loaded file are interpreted: any exception but a ``UserError``
    means a good archive holding the wrong contents (an entry of another type or shape, a
    missing key), and becomes one line naming the file and what was wrong; warnings that such
    contents set off are not printed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed contents fail in every way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a {what} written by this project: its contents do not fit "
                        f"({type(e).__name__}: {reason})") from None


def reads(what):
    """Decorator: run a function whose first argument is a file's path under ``reading``."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(path, *args, **kwargs):
            with reading(path, what):
                return fn(path, *args, **kwargs)
        return run
    return wrap


def load_checkpoint(path, map_location="cpu"):
    """A training checkpoint (see ``load_file``), checked to be one written by this project."""
    ckpt = load_file(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (no 'model'/'config' entries)")
    return ckpt
