"""The tests' fork server (forkserver.py) against its reference, subprocess.run: the same exit
status, output, folder, argv, environment and thread count, and a timeout that kills."""
import os
import subprocess
import sys

import pytest

import forkserver
from helpers import ROOT, script_env

PROBE = ("import os, sys, torch; print(sys.argv[1:], os.getcwd(), os.environ.get('PROBE'), torch.get_num_threads(), "
         "sys.path[0] == '', 'training.stops' in sys.modules); print('to stderr', file=sys.stderr); "
         "sys.exit(int(sys.argv[1]))")


@pytest.mark.parametrize("args", [
    ["-c", PROBE, "3", "x y"],
    ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
    ["-c", "raise SystemExit('a message')"],
    ["-c", "import sys; print(sys.stdin.read()[::-1])"],
    ["eval.py", "--no-such-flag"],
])
def test_a_script_runs_as_under_subprocess(tmp_path, args):
    env = script_env(PROBE="p", OMP_NUM_THREADS="2")
    cwd = ROOT if args[0] == "eval.py" else str(tmp_path)
    kw = dict(cwd=cwd, capture_output=True, text=True, timeout=120, input="abc")
    want = subprocess.run([sys.executable, *args], env=env, **kw)
    got = forkserver.run([sys.executable, *args], env=env, **kw)
    assert forkserver._servable([sys.executable, *args], env)  # it did not just fall back
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)


def test_output_to_a_file_stderr_merged_and_the_project_imported_anew(tmp_path):
    log = tmp_path / "log"
    code = "import sys; print('out'); print('err', file=sys.stderr); import training.stops as s; print(vars(s.SELF_SIGNAL))"
    with open(log, "w") as f:
        proc = forkserver.run([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=script_env(ADMM_AT_TEST_SIGNAL="pretrain:3:SIGTERM", PYTHONUNBUFFERED="1"))
    want = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=script_env(ADMM_AT_TEST_SIGNAL="pretrain:3:SIGTERM", PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0 and proc.stdout is None
    assert log.read_text() == "out\nerr\n" + want.stdout.split("\n", 1)[1]  # the module read this run's variable


def test_a_timeout_kills_the_script_and_another_interpreter_setting_falls_back():
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, "-c", "import time; time.sleep(60)"], env=script_env(), timeout=1)
    assert not forkserver._servable([sys.executable, "-c", "pass"], script_env(PYTHONHASHSEED="1"))
    assert not forkserver._servable([sys.executable, "-I", "-c", "pass"], script_env())
    proc = forkserver.run([sys.executable, "-c", "import sys; print(sys.flags.hash_randomization)"],
                          env=script_env(PYTHONHASHSEED="1"), capture_output=True, text=True)
    assert proc.stdout == "1\n"
