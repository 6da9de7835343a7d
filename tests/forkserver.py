"""``run``: ``subprocess.run`` for the Python scripts the tests start, without a new interpreter's
~2 s of ``import torch`` each (about 230 scripts in the suite, and most of its time).

A server process per test process imports torch, numpy, yaml and torchvision once and never runs
anything; each script runs in a fork of it: a fresh process with its own pid, exit status,
file descriptors, working folder and environment, in which the project's modules are imported
anew (they read the environment when they load). Commands it cannot run exactly as a new
interpreter would go to ``subprocess.run`` unchanged: another program, an interpreter flag
(``-I``, ``-m``), or an environment that differs from the server's in a variable read only when
an interpreter or OpenMP starts (``LOADED``). The thread count, which torch reads later, is set
from the request's ``OMP_NUM_THREADS``.

The server forks a waiter per request, which forks the script and reports its pid and then its
exit status exactly as ``subprocess`` gives it (negative for a signal). It exits when the test
process does (its stdin closes).
"""
import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading

# Read when the interpreter or the OpenMP runtime starts: a request must agree with the server's.
LOADED = ("PYTHONHASHSEED", "OMP_WAIT_POLICY", "PYTHONPATH", "PYTHONOPTIMIZE", "PYTHONDONTWRITEBYTECODE",
          "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONMALLOC", "KMP_AFFINITY", "GOMP_CPU_AFFINITY", "LD_PRELOAD")
SERVER_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONHASHSEED": "0"}
_server = {}  # {"proc": Popen, "path": socket path, "env": its environment} of this process's server
_subprocess_run = subprocess.run  # a test may put ``run`` in its place
_starting = threading.Lock()  # a sweep's driver calls ``run`` from several threads


def run(args, *, cwd=None, env=None, timeout=None, input=None, capture_output=False, text=False,
        stdout=None, stderr=None):
    """``subprocess.run`` with these arguments; ``[sys.executable, script or -c, ...]`` runs in a
    fork of the server (the module docstring)."""
    env = dict(os.environ if env is None else env)
    if not _servable(args, env):
        return _subprocess_run(args, cwd=cwd, env=env, timeout=timeout, input=input,
                              capture_output=capture_output, text=text, stdout=stdout, stderr=stderr)
    pipe_out = capture_output or stdout == subprocess.PIPE
    pipe_err = capture_output or stderr == subprocess.PIPE
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if input is not None:
            inp.write(input.encode() if isinstance(input, str) else input)
            inp.seek(0)
        fd_out = out.fileno() if pipe_out else 1 if stdout is None else stdout.fileno()
        fd_err = fd_out if stderr == subprocess.STDOUT else err.fileno() if pipe_err else 2 if stderr is None \
            else stderr.fileno()
        code = _request(args, cwd or os.getcwd(), env, timeout, [inp.fileno(), fd_out, fd_err])
        got = []
        for f, piped in ((out, pipe_out), (err, pipe_err and stderr != subprocess.STDOUT)):
            f.seek(0)
            got.append(None if not piped else f.read().decode() if text else f.read())
    return subprocess.CompletedProcess(args, code, *got)


def _servable(args, env):
    return (len(args) >= 2 and args[0] == sys.executable and (args[1] == "-c" or not args[1].startswith("-"))
            and all(env.get(k) == _server_env().get(k) for k in LOADED))


def _server_env():
    return _server["env"] if "env" in _server else {**os.environ, **SERVER_ENV}


def _request(args, cwd, env, timeout, fds):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(_start())
    with conn:
        socket.send_fds(conn, [b"r"], fds)
        conn.sendall(json.dumps({"argv": list(args[1:]), "cwd": os.path.abspath(cwd), "env": env}).encode())
        conn.shutdown(socket.SHUT_WR)
        reply = conn.makefile("r")
        pid = int(reply.readline())
        conn.settimeout(timeout)
        try:
            return int(reply.readline())
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(args, timeout) from None


def _start():
    """This process's server (started on first use, again if it died): its socket's path."""
    with _starting:
        return _start_once()


def _start_once():
    if "proc" not in _server or _server["proc"].poll() is not None:
        path = os.path.join(tempfile.mkdtemp(prefix="forkserver-"), "socket")
        env = {**os.environ, **SERVER_ENV}
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the fork server did not start (exit status {proc.wait()})")
        _server.update(proc=proc, path=path, env=env)
    return _server["path"]


def _serve(path):
    import numpy  # noqa: F401  the imports every script pays for, once
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import yaml  # noqa: F401
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:  # the test process has gone
            os._exit(0)
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _wait(conn)
        conn.close()


def _wait(conn):
    """The waiter: read the request, fork the script, report its pid and exit status."""
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    request = b""
    while chunk := conn.recv(1 << 16):
        request += chunk
    pid = os.fork()
    if pid == 0:
        conn.close()
        _script(json.loads(request), fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    finally:  # a client that timed out and killed the script has gone: nobody to tell
        os._exit(0)


def _script(request, fds):
    """The script's process: its stdio, folder, environment, argv and import path as
    ``python <argv>`` would have them; its exit status as the interpreter would give it."""
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
    import random

    import numpy
    import torch
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # A new interpreter's generators start from fresh entropy, not from the server's state.
    random.seed()
    numpy.random.seed()
    torch.seed()
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            import runpy
            sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1])
