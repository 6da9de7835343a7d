"""DDP on CPU (gloo, 2 processes via torchrun): 2 x half batch == 1 x full batch, and the ranks'
ADMM states agree (engine checks it at every Z/U update and logs it)."""
import sys

import torch
import forkserver
from helpers import ROOT, script_env

# SGD, not Adam: Adam's update is ~lr * sign(grad) for tiny gradients, which turns float-rounding
# differences (a batch of 32 vs 64 sums in another order) into differences of order lr.
SETTINGS = ["device=cpu", "data.train_limit=640", "pretrain.epochs=2", "admm.epochs=2", "retrain.epochs=1",
            "adv.steps=2", "adv.random_start=false", "eval.limit=100", "eval.steps=2",
            "pretrain.optimizer=sgd", "admm.optimizer=sgd", "retrain.optimizer=sgd",
            "pretrain.lr=0.05", "admm.lr=0.02", "retrain.lr=0.02"]


def _run(launcher, out, batch):
    sets = [a for o in (*SETTINGS, f"data.batch_size={batch}") for a in ("--set", o)]
    env = script_env()
    proc = forkserver.run([*launcher, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(out), *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_half_batch_match_one_process(tmp_path):
    _run([sys.executable], tmp_path / "one", 64)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                tmp_path / "two", 32)
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 processes x batch 32" in log
    assert log.count("ADMM state identical on 2 ranks") == 2  # one per Z/U update
    assert proc.stdout.count("final model") == 1  # only rank 0 logs
    for stage in ("pretrain", "admm", "retrain"):
        a = torch.load(tmp_path / "one" / f"{stage}.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / f"{stage}.pt", weights_only=True)
        for k in a["model"]:
            assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-3), (stage, k)
        if stage == "retrain":  # the same weights were pruned
            for k, m in a["masks"].items():
                assert torch.equal(m, b["masks"][k]), k
    pre_a = torch.load(tmp_path / "one" / "pretrain.pt", weights_only=True)["model"]
    pre_b = torch.load(tmp_path / "two" / "pretrain.pt", weights_only=True)["model"]
    assert max((pre_a[k] - pre_b[k]).abs().max().item() for k in pre_a) < 1e-6  # float rounding only


def test_autocast_settings_are_a_noop_on_cpu(tmp_path):
    """perf.amp / channels_last / compile are GPU fast paths; on CPU the run is unchanged."""
    base = [*SETTINGS[:6], "pretrain.epochs=1", "admm.epochs=1", "retrain.epochs=1", "eval.limit=100", "eval.steps=2"]

    def final(out, *extra):
        sets = [a for o in (*base, *extra) for a in ("--set", o)]
        proc = forkserver.run([sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(out), *sets],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=script_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out / "retrain.pt", weights_only=True)["model"]

    a = final(tmp_path / "plain")
    b = final(tmp_path / "fast", "perf.amp=fp16", "perf.channels_last=true", "perf.compile=true")
    assert all(torch.equal(a[k], b[k]) for k in a)
