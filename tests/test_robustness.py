"""Runs that survive: kill and resume, atomic saves, safe loading, NaN stops, config validation.
Every case runs the real scripts as a user would and checks the exit code and the message."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch


from deploy import formats
from common import UserError, load_checkpoint, save_checkpoint
import forkserver
from helpers import ROOT, run_script, script_env

SMALL = ["data.train_limit=640", "pretrain.epochs=2", "admm.epochs=4", "retrain.epochs=1", "adv.steps=2",
         "eval.steps=2", "eval.limit=100", "checkpoint.every_steps=2"]


def cmd(script, out, *overrides, extra=()):
    return [sys.executable, os.path.join(ROOT, script), "--config", "configs/demo.yaml", "--out", str(out),
            *[a for o in (*SMALL, *overrides) for a in ("--set", o)], *extra]


def run(args, signal_at=None):
    """``signal_at`` ("<stage>:<step>:<SIGNAME>"): the run sends itself that signal after that
    step (``training.SelfSignal``), a stop at a known point instead of a race with a timer."""
    env = script_env(**({"ADMM_AT_TEST_SIGNAL": signal_at} if signal_at else {}))
    return forkserver.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the small config."""
    out = tmp_path_factory.mktemp("ref")
    proc = run(cmd("adv_main.py", out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_sigkill_mid_admm_then_resume_gives_identical_weights(tmp_path, reference):
    out = tmp_path / "killed"
    # no chance to clean up: killed in ADMM's second epoch (10 steps each), 3 steps after its last save
    proc = run(cmd("adv_main.py", out), signal_at="admm:15:SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    assert (out / "pretrain.pt").exists() and not (out / "admm.pt").exists()
    last = load_checkpoint(str(out / "admm.last.pt"))
    assert (last["epoch"], last["step"]) == (1, 4)

    resumed = run(cmd("adv_main.py", out, extra=["--resume"]))  # takes the dead run's lock as usual
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming admm" in resumed.stdout
    a, b = weights(reference / "retrain.pt"), weights(out / "retrain.pt")
    assert a.keys() == b.keys()
    for k in a:  # same seed, CPU: bit-identical to the uninterrupted run
        assert torch.equal(a[k], b[k]), k
    assert not list(out.glob(".tmp-*")) and not (out / "admm.last.pt").exists()


def test_sigterm_saves_and_says_how_to_resume(tmp_path, reference):
    out = tmp_path / "term"
    proc = run(cmd("adv_main.py", out), signal_at="pretrain:3:SIGTERM")
    err = proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(str(out / "pretrain.last.pt"))
    assert ckpt["stage"] == "pretrain" and (ckpt["epoch"], ckpt["step"]) == (0, 3)  # saved at the step it stopped
    resumed = run(cmd("adv_main.py", out, extra=["--resume"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(reference / "retrain.pt"), weights(out / "retrain.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["x.pt"]  # no temp file left behind


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    target = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Evil(str(target)), "config": {}}, f)
    with pytest.raises(UserError, match="weights-only"):
        load_checkpoint(str(bad))
    proc = run_script("eval.py", "--ckpt", str(bad))
    assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr
    proc = run(cmd("adv_main.py", tmp_path / "r", extra=["--stage", "admm", "--init", str(bad)]))
    assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr
    assert not target.exists()


def test_malicious_safetensors_header_is_refused_without_running_code(tmp_path):
    """A safetensors export whose header carries a pickle (that would create ``target`` if
    unpickled), or claims tensor bytes the file does not have: JSON and raw bytes are all that is
    read, so the file is refused in one line and nothing runs."""
    st = pytest.importorskip("safetensors.torch")
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    st.save_file({"state/w": torch.zeros(2)}, str(evil), metadata={
        "format": "admm-at-export", "export": pickle.dumps(_Evil(str(target)), protocol=0).decode("latin-1")})
    lying = tmp_path / "lying.safetensors"
    header = json.dumps({"state/w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}).encode()
    lying.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    # The evil header says it is an export; the lying one says nothing, so it is read as a plain
    # safetensors file (outside weights).
    for bad, what in ((evil, "not a valid safetensors export"), (lying, "not a valid safetensors file")):
        with pytest.raises(UserError, match=what):
            formats.load_model(str(bad))
        proc = run_script("eval.py", "--ckpt", str(bad))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and what in proc.stderr
    assert not target.exists()


def test_nan_loss_stops_with_stage_epoch_step_and_keeps_last_good_state(tmp_path, reference):
    out = tmp_path / "nan"
    os.makedirs(out)
    (out / "pretrain.pt").write_bytes((reference / "pretrain.pt").read_bytes())
    before = digest(out / "pretrain.pt")
    # An absurd learning rate: step 1 is finite, its update makes step 2's loss non-finite.
    proc = run(cmd("adv_main.py", out, "admm.optimizer=sgd", "admm.lr=1e30", "checkpoint.every_steps=1",
                   extra=["--stage", "admm"]))
    assert proc.returncode == 2
    assert "admm stage: loss is not finite" in proc.stderr and "epoch 1, step 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert digest(out / "pretrain.pt") == before and not (out / "admm.pt").exists()
    last = load_checkpoint(str(out / "admm.last.pt"))  # the state after step 1 is intact
    assert last["step"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values())


def test_existing_results_are_not_overwritten(tmp_path, reference):
    before = digest(reference / "retrain.pt")
    proc = run(cmd("adv_main.py", reference))
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert digest(reference / "retrain.pt") == before


@pytest.fixture(scope="module")
def pretrained(reference):
    return str(reference / "pretrain.pt")


def _truncated(tmp_path, pretrained):
    p = tmp_path / "trunc.pt"
    p.write_bytes(open(pretrained, "rb").read()[:1000])
    return ["--stage", "admm", "--init", str(p)]


# (overrides, extra args, words the one-line message must contain)
BAD_INPUTS = {
    "unknown key": (["adv.epss=0.1"], [], ["adv.epss", "did you mean adv.eps"]),
    "unknown section": (["advv.eps=0.1"], [], ["advv", "did you mean adv"]),
    "wrong type": (["adv.steps=ten"], [], ["adv.steps", "integer"]),
    "wrong bool": (["data.synthetic=maybe"], [], ["data.synthetic", "true or false"]),
    "ratio 1": (["prune.prune_ratios={conv1.weight: 1.0}"], [], ["conv1.weight", "[0, 1)"]),
    "ratio negative": (["prune.prune_ratios={conv1.weight: -0.1}"], [], ["conv1.weight", "[0, 1)"]),
    "negative eps": (["adv.eps=-0.1"], [], ["adv.eps", "in [0, 1]"]),
    "eps beyond the image range": (["adv.eps=5"], [], ["adv.eps", "in [0, 1]", "got 5.0"]),
    "seed -1": (["seed=-1"], [], ["seed", "2^32 - 1", "got -1"]),
    "negative steps": (["adv.steps=-3"], [], ["adv.steps", ">= 0"]),
    "bad fraction": (["adv.eps=8/0"], [], ["adv.eps", "fraction"]),
    "unknown arch": (["model.arch=vgg19"], [], ["model.arch", "vgg19", "lenet"]),
    "unknown dataset": (["data.dataset=imagenet"], [], ["data.dataset", "imagenet", "cifar10"]),
    "unknown sparsity type": (["prune.sparsity_type=block"], [], ["prune.sparsity_type", "block", "filter"]),
    "unknown optimizer": (["admm.optimizer=rmsprop"], [], ["admm.optimizer", "rmsprop", "sgd"]),
    "unknown parameter name": (["prune.prune_ratios={conv3.weight: 0.5}"], [],
                               ["conv3.weight", "valid names", "conv1.weight", "fc2.weight"]),
    "missing stage input": ([], ["--stage", "retrain"], ["admm.pt", "does not exist", "--init"]),
    "missing init file": ([], ["--stage", "admm", "--init", "/nonexistent/p.pt"], ["/nonexistent/p.pt"]),
    "missing dataset": (["data.dataset=mnist", "data.root=/nonexistent/data", "data.download=false"], [],
                        ["MNIST", "/nonexistent/data"]),
    "missing config": ([], ["--config", "configs/nope.yaml"], ["configs/nope.yaml"]),
    "nan eps": (["adv.eps=.nan"], [], ["adv.eps", "finite"]),
    "inf lr": (["pretrain.lr=.inf"], [], ["pretrain.lr", "finite"]),
    "nan rho": (["prune.rho=.nan"], [], ["prune.rho", "finite"]),
    "nan rho growth": (["quant.rho_growth=.nan"], [], ["quant.rho_growth", "finite"]),
    "inf step size": (["adv.step_size=.inf"], [], ["adv.step_size", "finite"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(tmp_path, name):
    """In-process, as adv_main.py runs it up to the first work: one line naming the key."""
    from training import command as engine
    overrides, extra, words = BAD_INPUTS[name]
    args = cmd("adv_main.py", tmp_path / "r", *overrides, extra=extra)[2:]
    with pytest.raises(UserError) as e:
        engine._run(engine.parse_args(args, True), True)
    line = str(e.value)
    assert "\n" not in line
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "r" / "pretrain.pt").exists()


@pytest.mark.parametrize("overrides", [["adv.epss=0.1"], ["adv.eps=.nan"]], ids=["unknown key", "nan"])
def test_bad_input_ends_the_script_with_one_line_and_status_2(tmp_path, overrides):
    """The two subprocess smoke tests of the above: what the user sees."""
    proc = run(cmd("adv_main.py", tmp_path / "r", *overrides))
    assert proc.returncode == 2, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and overrides[0].split("=")[0] in line


def test_checkpoint_of_another_width_is_refused(tmp_path, pretrained):
    proc = run(cmd("adv_main.py", tmp_path / "r", "model.width=8", extra=["--stage", "admm", "--init", pretrained]))
    assert proc.returncode == 2 and "model.width=4" in proc.stderr and "8" in proc.stderr


def test_truncated_checkpoint_is_refused(tmp_path, pretrained):
    proc = run(cmd("adv_main.py", tmp_path / "r", extra=_truncated(tmp_path, pretrained)))
    assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc = run(cmd("adv_main.py", blocker / "run"))
    assert proc.returncode == 2 and "cannot write to run folder" in proc.stderr and "--out" in proc.stderr
    assert blocker.read_text() == "a file, not a folder"


def test_free_training_resumes_exactly(tmp_path):
    """free carries its perturbation across minibatches; it is part of the saved state."""
    free = ["adv.method=free", "adv.free_replays=2", "checkpoint.every_steps=1"]
    ref = run(cmd("adv_main.py", tmp_path / "ref", *free, extra=["--stage", "pretrain"]))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = run(cmd("adv_main.py", out, *free, extra=["--stage", "pretrain"]), signal_at="pretrain:5:SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "pretrain.pt").exists() and load_checkpoint(str(out / "pretrain.last.pt"))["step"] == 4
    assert load_checkpoint(str(out / "pretrain.last.pt"))["method_state"].abs().sum() > 0
    resumed = run(cmd("adv_main.py", out, *free, extra=["--stage", "pretrain", "--resume"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "ref" / "pretrain.pt"), weights(out / "pretrain.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_admm_without_pruned_layers_is_refused(tmp_path):
    proc = run(cmd("adv_main.py", tmp_path / "r", "prune.prune_ratios={}"))
    assert proc.returncode == 2 and "prunes no layer" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_with_the_other_script_is_refused(tmp_path, reference):
    proc = run(cmd("main.py", reference, extra=["--resume", "--stage", "retrain"]))
    assert proc.returncode == 2 and "adv_main.py" in proc.stderr


def test_a_run_folder_given_as_checkpoint_names_the_checkpoints_in_it(tmp_path, capsys):
    import importlib
    from common import run_cli
    for name in ("retrain.pt", "pretrain.pt", ".tmp-admm.pt-x1", "log.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        run_cli(importlib.import_module("eval").main, ["--ckpt", str(tmp_path)])
    assert e.value.code == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {tmp_path} is a folder, not a checkpoint; give one of its files: "
                    f"{tmp_path / 'pretrain.pt'}, {tmp_path / 'retrain.pt'}")


def test_a_stop_request_is_honoured_within_one_attack_iteration(tmp_path):
    """adv.steps=10^12: the first step's attack would never end; SIGTERM ends it at once, and the
    state from before that step is saved for --resume."""
    proc = subprocess.Popen(cmd("adv_main.py", tmp_path, "adv.steps=1000000000000", "checkpoint.every_steps=0"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())
    try:
        for line in proc.stdout:  # the log's header row comes just before the first step
            if line.startswith("stage "):
                break
        time.sleep(1.0)  # well inside the first step's attack
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopping the training attack" in err and "after step 0; saved" in err and "--resume" in err
    last = load_checkpoint(str(tmp_path / "pretrain.last.pt"))
    assert last["step"] == 0 and last["epoch"] == 0 and "Traceback" not in err

