"""Runs that survive the real world: two runs on one folder, and a disk that fills up at each
place the project writes. The runs are the real entry points (``engine.run``, as main.py and
adv_main.py call it), in-process where a fault is injected, as subprocesses where the test needs
two processes or a real file system."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from training import command as engine
from common import UserError, load_checkpoint, run_cli
import forkserver
from helpers import ROOT, full_disk, script_env
from training.rundir import RunFolder

CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
TINY = ["data.train_limit=256", "pretrain.epochs=2", "admm.epochs=1", "retrain.epochs=1", "adv.steps=1",
        "eval.steps=1", "eval.limit=50", "checkpoint.every_steps=2"]


def argv(out, *sets, extra=()):
    return ["--config", CONFIG, "--out", str(out), *[a for o in (*TINY, *sets) for a in ("--set", o)], *extra]


def main(args):
    """``adv_main.py args`` in this process: its exit status (0 when it returns)."""
    try:
        engine.run(args, adversarial=True)
    except SystemExit as e:
        return e.code
    return 0


def files(folder):
    """{name: bytes} of every file in ``folder``, hidden ones included."""
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("ref")
    assert main(argv(out)) == 0
    return torch.load(out / "retrain.pt", weights_only=True)["model"]


# --------------------------------------------------------------------------- one owner per folder

def test_second_run_on_a_busy_folder_stops_at_once_and_touches_nothing(tmp_path):
    """The first run pauses itself (SIGSTOP) after 3 steps, holding the folder; the second, same
    command, stops with one line naming the first's PID and host, and changes no byte."""
    out = tmp_path / "same"
    cmd = [sys.executable, "adv_main.py", *argv(out, extra=["--stage", "pretrain"])]
    env = script_env(ADMM_AT_TEST_SIGNAL="pretrain:3:SIGSTOP")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status = os.waitpid(first.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), "the first run ended before it paused"
            before = files(out)
            assert "pretrain.last.pt" in before and "log.txt" in before
            second = forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())
            assert files(out) == before  # byte for byte
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    assert second.returncode == 2
    line, = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {out} is in use by another run (PID {first.pid} on {socket.gethostname()}")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("pretrain", 1), ("pretrain", 2)]  # one run's rows


def test_lock_is_held_while_the_block_runs_and_dropped_after(tmp_path):
    with RunFolder(str(tmp_path)).locked():
        with pytest.raises(UserError, match=f"in use by another run \\(PID {os.getpid()} on "):
            with RunFolder(str(tmp_path)).locked():
                pass
    with RunFolder(str(tmp_path)).locked():  # free again
        pass


def test_a_sweep_folder_has_one_sweep_at_a_time(tmp_path):
    sweep = __import__("importlib").import_module("experiments.sweep")
    with RunFolder(str(tmp_path)).locked():
        with pytest.raises(UserError, match="in use by another run"):
            sweep.main(["--quick", "--out", str(tmp_path), "--only", "pre-adv-w1"])


# --------------------------------------------------------------------------- a disk that fills up

# {file: (opens of it that succeed, writes of the failing one that succeed, then bytes of the
# next, the checkpoint then intact)}. 4 steps an epoch, saved every 2: pretrain.last.pt is
# written at steps 2 and 4 of each epoch, before the epoch's metrics row and log row.
SITES = {
    "config.yaml": (0, 0, 10, None),
    "log.txt": (0, 5, 30, "pretrain.last.pt"),   # the 6th line (after the eps_ramp warning): epoch 1's row
    "metrics.jsonl": (3, 0, 40, "admm.last.pt"),  # 2 rows, admm's start drops none, then half its Z/U row
    "pretrain.last.pt": (1, 0, 1000, "pretrain.last.pt"),
    "pretrain.pt": (0, 0, 1000, "pretrain.last.pt"),
    "admm.last.pt": (1, 0, 5000, "admm.last.pt"),
    "eval.json": (0, 0, 100, "retrain.pt"),
}


@pytest.mark.parametrize("site", list(SITES))
def test_full_disk_at_each_write_site_is_one_line_and_resume_finishes_the_run(site, tmp_path, capsys, monkeypatch,
                                                                             reference):
    skip, calls, after, intact = SITES[site]
    out = tmp_path / "run"
    faults = full_disk(monkeypatch, site, skip, after, calls + 1)
    assert main(argv(out)) == 2
    monkeypatch.undo()  # a roomy disk again
    assert faults["failed"] == 1
    err = capsys.readouterr().err
    line, = err.strip().splitlines()
    assert line.startswith(f"error: cannot write {out / site}: No space left on device (ENOSPC); "), line
    if intact:
        assert f"the last complete checkpoint, {out / intact}, is intact" in line
        load_checkpoint(str(out / intact))
    else:
        assert "no checkpoint of this run was written yet" in line
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    if (out / "metrics.jsonl").exists():  # never half a row
        [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    command = shlex.split(line.split(" and continue with: " if intact else " and start it again with: ")[1])
    assert command[:2] == ["python", "adv_main.py"] and ("--resume" in command) == bool(intact)
    assert main(command[2:]) == 0, capsys.readouterr().err
    final = torch.load(out / "retrain.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows if r["kind"] == "epoch"] == \
        [("pretrain", 1), ("pretrain", 2), ("admm", 1), ("retrain", 1)]
    assert json.loads((out / "eval.json").read_text())["accuracy"]


def _mount_tmpfs(path, size):
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_3mb_disk_ends_the_run_with_one_line_and_resume_finishes_it(tmp_path, reference):
    """The demo's pretraining checkpoint is 2.5 MB: the second save of it does not fit in 3 MB."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full disk above covers each write site")
    try:
        out = disk / "run"
        proc = forkserver.run([sys.executable, "adv_main.py", *argv(out)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=script_env())
        assert proc.returncode == 2, proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert "No space left on device (ENOSPC)" in line and "is intact" in line and "Traceback" not in line
        assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        resume = shlex.split(line.split(" and continue with: ")[1])
        proc = forkserver.run([sys.executable, *resume[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=script_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
        final = torch.load(out / "retrain.pt", weights_only=True)["model"]
        assert all(torch.equal(final[k], reference[k]) for k in reference)
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("script,flag,name", [("export.py", "--out", "x.export.pt"), ("export.py", "--json", "x.json"),
                                              ("eval.py", "--json", "x.json"), ("eval.py", "--plot", "x.png")])
def test_full_disk_in_eval_and_export_is_one_line_and_leaves_no_file(script, flag, name, tmp_path, capsys,
                                                                      monkeypatch):
    ckpt = tmp_path / "retrain.pt"
    shutil.copy(os.path.join(ROOT, "tests", "golden", "retrain.pt"), ckpt)
    args = ["--ckpt", str(ckpt), flag, str(tmp_path / name)]
    args += {"export.py": ["--no-latency"] + (["--out", str(tmp_path / "e.pt")] if flag != "--out" else []),
             "eval.py": ["--limit", "20", "--no-checks"]
             + (["--attacks", "fgsm", "--eps-sweep", "0,0.1"] if flag == "--plot" else ["--attacks", "natural"])}[script]
    full_disk(monkeypatch, name, after=64)
    with pytest.raises(SystemExit) as e:
        run_cli(__import__("importlib").import_module(script[:-3]).main, args)
    assert e.value.code == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: cannot write {tmp_path / name}: No space left on device (ENOSPC); nothing was left "
                    "half-written: free some space and run the command again")
    assert not (tmp_path / name).exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    if script == "export.py":  # a failed --json leaves no export behind: the export is written last
        assert not (tmp_path / "e.pt").exists() and not (tmp_path / "x.export.pt").exists()
