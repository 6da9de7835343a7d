"""Weights from outside: state dicts in every layout RobustBench, HYDRA and
HARP ship, read by eval.py's and export.py's reader and by --init. Expected values come from the
model that wrote the file, or from a hand-written masked forward (torch.nn.functional) and a
count of kept weights done here from the scores, never from the code under test."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
from common import LOG, UserError
from deploy import formats
from models import build_model
import forkserver
from helpers import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def demo_cfg(*sets):
    return config.load_config(os.path.join(ROOT, "configs/demo.yaml"), ["model.width=1", *sets])


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model("lenet", 1, 10, 1, 28).eval()


def logits(path, *sets):
    model, _, meta = formats.load_model(str(path), cfg=demo_cfg(*sets))
    with torch.no_grad():
        return model(X), meta


def saved(tmp_path, name, obj):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- layouts of a plain state dict

def _plain(sd):
    return {k: v for k, v in sd.items() if not k.startswith("normalize.")}  # as another codebase has it


LAYOUTS = {
    "plain.pt": lambda sd: sd,
    "nested_state_dict_module.pt": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    "nested_model.pt": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "nested_net.pt": lambda sd: {"net": sd, "acc": 91.0},
    "plain.safetensors": lambda sd: sd,
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_loads_to_the_same_logits(tmp_path, lenet, name):
    path = saved(tmp_path, name, LAYOUTS[name](_plain(lenet.state_dict())))
    got, meta = logits(path)
    with torch.no_grad():
        assert torch.equal(got, lenet(X))
    assert meta["format"] == "outside"


def test_a_state_dict_for_another_architecture_is_one_line_naming_the_keys(tmp_path):
    path = saved(tmp_path, "r.pt", build_model("resnet18", 1, 10, 3, 32).state_dict())
    with pytest.raises(UserError) as e:
        logits(path)
    msg = str(e.value)
    assert "\n" not in msg and "missing (conv1.bias" in msg and "unexpected (bn1.weight" in msg
    # LeNet's keys that resnet18's state dict lacks, counted here: conv1.bias, conv2.weight, conv2.bias, fc1.weight,
    # fc1.bias, fc2.weight, fc2.bias.
    assert "7 missing" in msg
    assert "wrong-shaped (conv1.weight [4, 3, 3, 3] vs [2, 1, 5, 5])" in msg


def test_weights_without_a_config_ask_for_one(tmp_path, lenet):
    path = saved(tmp_path, "p.pt", lenet.state_dict())
    with pytest.raises(UserError, match="--config FILE and --set model.arch"):
        formats.load_model(str(path))


def test_a_checkpoint_of_this_project_refuses_a_second_config():
    with pytest.raises(UserError, match="carries its own config; drop --config"):
        formats.load_model(os.path.join(ROOT, "tests/golden/retrain.pt"), cfg=demo_cfg())


def test_the_files_normalization_wins_with_a_warning(tmp_path, lenet, caplog, monkeypatch):
    monkeypatch.setattr(LOG, "propagate", True)  # an earlier test in this process may have set up logging
    sd = dict(lenet.state_dict())
    sd["normalize.mean"], sd["normalize.std"] = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    got, _ = logits(saved(tmp_path, "n.pt", sd))
    ref = build_model("lenet", 1, 10, 1, 28, (0.5,), (0.25,)).eval()
    ref.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(got, ref(X))
    assert any("normalizes with mean [0.5]" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- HYDRA and HARP

def lenet_by_hand(sd, x):
    """LeNet's forward written out here, inputs in [0, 1] (identity normalization)."""
    h = F.max_pool2d(F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, sd["conv2.weight"], sd["conv2.bias"], padding=2)), 2)
    return F.linear(F.relu(F.linear(h.flatten(1), sd["fc1.weight"], sd["fc1.bias"])), sd["fc2.weight"], sd["fc2.bias"])


WEIGHTS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")


def subnet_state(lenet, seed=2):
    """The layout of HYDRA's / HARP's SubnetConv and SubnetLinear: ``weight`` dense, ``popup_scores``
    of the weight's shape beside it, saved under "state_dict" from a DataParallel model."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in _plain(lenet.state_dict()).items()}
    for w in WEIGHTS:
        sd[w.replace("weight", "popup_scores")] = torch.randn(sd[w].shape, generator=g)
    return sd


def kept_by_hand(scores, k):
    """HYDRA's rule, counted with numpy: sort |scores| ascending, zero the first int((1 - k) n)."""
    a = np.abs(scores.numpy().ravel())
    j = int((1 - k) * a.size)
    mask = np.ones(a.size, bool)
    mask[np.argsort(a, kind="stable")[:j]] = False
    return torch.from_numpy(mask.reshape(scores.shape))


def test_hydra_checkpoint_is_its_masked_model(tmp_path, lenet):
    sd = subnet_state(lenet)
    path = saved(tmp_path, "hydra.pth.tar", {"epoch": 20, "state_dict": {f"module.{k}": v for k, v in sd.items()},
                                             "best_prec1": 50.0, "optimizer": {}})
    got, meta = logits(path, "subnet.k=0.3")
    masks = {w: kept_by_hand(sd[w.replace("weight", "popup_scores")], 0.3) for w in WEIGHTS}
    # Independent counts: conv1 50 weights -> int(0.7 * 50) = 35 dropped, 15 kept; conv2 200 -> 140 dropped;
    # fc1 64 x 196 = 12544 -> int(0.7 * 12544) = int(8780.8) = 8780 dropped; fc2 640 -> 448 dropped.
    assert [int(m.sum()) for m in masks.values()] == [15, 60, 12544 - 8780, 192]
    assert {n: int(m.sum()) for n, m in meta["masks"].items()} == {n: int(m.sum()) for n, m in masks.items()}
    masked = {k: (v * masks[k] if k in masks else v) for k, v in sd.items()}
    torch.testing.assert_close(got, lenet_by_hand(masked, X), rtol=0, atol=1e-5)


def test_harp_checkpoint_uses_its_learned_rates(tmp_path, lenet):
    sd = subnet_state(lenet, seed=3)
    k_scores = {"conv1": 2.0, "conv2": -1.0, "fc1": -3.0, "fc2": 0.5}
    for layer, v in k_scores.items():
        sd[f"{layer}.k_score"] = torch.tensor(v)
    path = saved(tmp_path, "harp.pth.tar", {"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    k, alpha = 0.1, 0.1
    got, meta = logits(path, f"subnet.k={k}", f"subnet.alpha={alpha}")
    masks = {}
    for layer, v in k_scores.items():  # HARP's rate_act_func in float32: sigmoid(s) (1 - k_min) + k_min
        rate = np.float32(1) / (np.float32(1) + np.exp(np.float32(-v))) * np.float32(1 - k * alpha) + np.float32(k * alpha)
        masks[f"{layer}.weight"] = kept_by_hand(sd[f"{layer}.popup_scores"], np.float32(rate))
    assert {n: int(m.sum()) for n, m in meta["masks"].items()} == {n: int(m.sum()) for n, m in masks.items()}
    assert int(masks["conv1.weight"].sum()) > int(masks["fc1.weight"].sum()) * 50 / 12544  # rates differ by layer
    masked = {kk: (vv * masks[kk] if kk in masks else vv) for kk, vv in sd.items() if not kk.endswith("k_score")}
    torch.testing.assert_close(got, lenet_by_hand(masked, X), rtol=0, atol=1e-5)


def test_hydra_checkpoint_without_k_is_one_line_exit_2(tmp_path, lenet):
    path = saved(tmp_path, "hydra.pt", {"state_dict": subnet_state(lenet)})
    proc = forkserver.run([sys.executable, "eval.py", "--ckpt", str(path), "--config", "configs/demo.yaml",
                           "--set", "model.width=1", "--attacks", "natural", "--limit", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())
    assert proc.returncode == 2, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "HYDRA" in line and "--set subnet.k=K" in line


def test_hydra_checkpoint_exports_and_fine_tunes(tmp_path, lenet):
    """export.py exports its masked model; --init starts a retrain from it, masks held."""
    sd = subnet_state(lenet)
    path = saved(tmp_path, "hydra.pt", {"state_dict": sd})
    common = ["--config", "configs/demo.yaml", "--set", "model.width=1", "--set", "subnet.k=0.3"]
    out = tmp_path / "h.export.pt"
    proc = forkserver.run([sys.executable, "export.py", "--ckpt", str(path), "--out", str(out), "--no-latency", *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr
    model, _, _ = formats.load_exported(str(out))
    masks = {w: kept_by_hand(sd[w.replace("weight", "popup_scores")], 0.3) for w in WEIGHTS}
    masked = {k: (v * masks[k] if k in masks else v) for k, v in sd.items() if "popup" not in k}
    with torch.no_grad():
        torch.testing.assert_close(model(X), lenet_by_hand(masked, X), rtol=0, atol=1e-5)
    run = tmp_path / "run"
    proc = forkserver.run([sys.executable, "main.py", *common, "--out", str(run), "--stage", "retrain", "--init", str(path),
                           "--set", "retrain.epochs=1", "--set", "data.train_limit=128", "--set", "eval.limit=50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(run / "retrain.pt", weights_only=True)
    for w, m in masks.items():  # pruned weights stayed pruned through fine-tuning
        assert not ckpt["model"][w][~m].any() and ckpt["model"][w][m].ne(0).any()


# --------------------------------------------------------------------------- files that are not a model

def test_non_finite_weights_are_refused_everywhere(tmp_path):
    ckpt = torch.load(os.path.join(ROOT, "tests/golden/retrain.pt"), weights_only=True)
    ckpt["model"]["fc1.weight"][0, :3] = float("nan")
    ckpt["model"]["fc2.bias"][0] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"fc1.weight holds 3 NaN or inf values of 12544"):
        formats.load_model(str(path))
    for cmd in (["eval.py", "--ckpt", str(path), "--attacks", "natural"],
                ["export.py", "--ckpt", str(path), "--out", str(tmp_path / "e.pt")],
                ["main.py", "--config", "configs/demo.yaml", "--set", "model.width=1", "--stage", "retrain",
                 "--init", str(path), "--out", str(tmp_path / "run")]):
        proc = forkserver.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())
        assert proc.returncode == 2, (cmd, proc.stderr)
        line, = proc.stderr.strip().splitlines()
        assert "fc1.weight holds 3 NaN or inf values" in line, line
    assert not (tmp_path / "e.pt").exists()
    sd = {k: v.clone() for k, v in ckpt["model"].items() if k != "fc1.weight"}
    sd["fc1.weight"] = torch.full((64, 196), float("inf"))
    with pytest.raises(UserError, match="fc1.weight holds 12544 NaN or inf values"):
        logits(saved(tmp_path, "inf.safetensors", sd))


def test_a_folder_or_an_export_given_as_a_checkpoint_is_called_so(tmp_path):
    golden = os.path.join(ROOT, "tests/golden")
    with pytest.raises(UserError, match="is a folder, not a checkpoint"):
        formats.read_checkpoint(golden, None, "--init")
    with pytest.raises(UserError, match=r"is an export \(torch, written by export.py\).*eval.py --ckpt"):
        formats.read_checkpoint(os.path.join(golden, "retrain.export.pt"), None, "--init")
    proc = forkserver.run([sys.executable, "export.py", "--ckpt", os.path.join(golden, "retrain.pt"), "--out",
                           str(tmp_path / "g.export.safetensors"), "--no-latency"], cwd=ROOT, capture_output=True, timeout=300, env=script_env())
    assert proc.returncode == 0
    with pytest.raises(UserError, match=r"is an export \(safetensors, written by export.py\).*--init needs"):
        formats.read_checkpoint(str(tmp_path / "g.export.safetensors"), None, "--init")


def test_a_truncated_file_is_one_line(tmp_path, lenet):
    path = saved(tmp_path, "t.pt", {"state_dict": lenet.state_dict()})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="cannot load checkpoint"):
        logits(path)
    st = saved(tmp_path, "t.safetensors", _plain(lenet.state_dict()))
    st.write_bytes(st.read_bytes()[:-20])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        logits(st)


def test_a_folder_as_rates_from_or_init_is_called_a_folder(tmp_path):
    for extra in (["--set", "prune.allocation=from_checkpoint", "--set", "prune.target=0.5",
                   "--set", f"prune.rates_from={tmp_path}"], ["--init", str(tmp_path)]):
        proc = forkserver.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--set", "model.width=1",
                               "--stage", "admm", "--out", str(tmp_path / "run"), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())
        assert proc.returncode == 2, proc.stderr
        line, = proc.stderr.strip().splitlines()
        assert "is a folder" in line and "does not exist" not in line, line
