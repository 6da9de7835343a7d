"""Compact export (channels.py, storage.py, exportfile.py, measure.py, export.py): the compact model computes what the masked model
computes, sparse storage round-trips bit for bit, unpruned exports are identities, malformed
files are refused, and the export is plain data."""
import importlib
import json
import os
import sys

import pytest
import torch
from torch import nn

import admm
from deploy import channels
from deploy import exportfile
from deploy import formats
from deploy import measure
import models
from deploy import storage
from common import UserError, run_cli, save_checkpoint
from config import load_config
from data import INFO
from models import model_from_config
import forkserver
from helpers import ROOT, SETUPS, inputs, make, max_rel_diff, script_env

SCHEMES = ("irregular", "filter", "column")


def roundtrip(model, cfg, tmp_path, storage="compact"):
    path = str(tmp_path / f"export-{storage}.pt")
    save_checkpoint(exportfile.export_model(model, cfg, storage), path)
    small, cfg2, exp = formats.load_exported(path)
    return small, exp, path


# --------------------------------------------------------------------------- same outputs

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", list(SETUPS))
def test_compact_model_matches_masked_model(arch, scheme, tmp_path):
    masked, cfg = make(arch, scheme)
    small, exp, _ = roundtrip(masked, cfg, tmp_path)
    x = inputs(cfg)
    with torch.no_grad():
        ref, out = masked(x), small(x)
    assert ref.std(0).max() > 1e-3 * ref.abs().max()  # the outputs depend on the input: a real comparison
    assert max_rel_diff(out, ref) <= 1e-5
    assert set(dict(small.named_parameters())) <= set(dict(masked.named_parameters()))  # real names
    if scheme == "filter":  # the channels are really gone: fewer parameters and MACs
        f = exp["figures"]
        assert f["params"]["compact"] < 0.6 * f["params"]["dense"]
        assert f["macs"]["compact"] < 0.6 * f["macs"]["dense"]


@pytest.mark.parametrize("arch", list(SETUPS))
def test_filter_pruned_channels_are_removed_with_their_bn_and_inputs(arch):
    masked, cfg = make(arch, "filter")
    small = channels.compact_model(masked, exportfile.input_shape(cfg))
    assert not any(m.training for m in small.modules())  # new BN layers in train mode would use batch statistics
    big, mods = dict(masked.named_modules()), dict(small.named_modules())
    for g in channels.channel_groups(masked):
        if len(g.producers) > 1:
            continue  # a ResNet stream loses a channel only where all its writers pruned it (next test)
        layer, bn = g.producers[0]
        n = big[layer].weight.shape[0]
        kept = n - admm.n_pruned(n, 0.5)
        assert mods[layer].weight.shape[0] == kept, layer
        if bn:
            assert mods[bn].running_mean.shape == (kept,) and mods[bn].weight.shape == (kept,)
        for c in g.consumers:
            assert mods[c].weight.shape[1] == kept * big[c].weight.shape[1] // n, c


def test_resnet_stream_channel_removed_only_where_every_writer_pruned_it():
    masked, cfg = make("resnet18", ratio=0)
    w = admm.prunable_weights(masked)
    with torch.no_grad():  # layer2's stream: block 0 conv2, its shortcut, block 1 conv2
        for n in ("layer2.0.conv2.weight", "layer2.0.shortcut.0.weight", "layer2.1.conv2.weight"):
            w[n][0] = 0    # channel 0 zero in all three writers: removable
        for n in ("layer2.0.conv2.weight", "layer2.1.conv2.weight"):
            w[n][1] = 0    # channel 1 still written by the shortcut: must stay
    small = channels.compact_model(masked, exportfile.input_shape(cfg))
    assert small.layer2[0].conv2.out_channels == w["layer2.0.conv2.weight"].shape[0] - 1
    width = small.layer2[0].conv2.out_channels
    assert small.layer2[0].shortcut[1].num_features == small.layer2[1].bn2.num_features == width
    assert small.layer3[0].conv1.in_channels == small.layer3[0].shortcut[0].in_channels == width
    assert small.layer2[0].conv1.out_channels == masked.layer2[0].conv1.out_channels  # inner channels untouched
    with torch.no_grad():
        x = inputs(cfg)
        assert max_rel_diff(small(x), masked(x)) <= 1e-5


def test_column_pruned_input_channel_leaves_with_its_producer_filter():
    masked, cfg = make("vgg16", ratio=0)
    n = masked.features[0].out_channels
    with torch.no_grad():
        masked.features[3].weight[:, 0] = 0  # every column of input channel 0 of its only reader
    small = channels.compact_model(masked, exportfile.input_shape(cfg))
    assert small.features[0].out_channels == small.features[1].num_features == small.features[3].in_channels == n - 1
    with torch.no_grad():
        x = inputs(cfg)
        assert max_rel_diff(small(x), masked(x)) <= 1e-5


def test_resnet_stream_channel_unread_by_one_reader_is_kept():
    masked, cfg = make("resnet18", ratio=0)
    readers = ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"]  # of conv1 + layer1
    mods = dict(masked.named_modules())
    n = masked.conv1.out_channels
    with torch.no_grad():
        for c in readers:
            mods[c].weight[:, 0] = 0  # channel 0 unread by every reader: removed
        mods[readers[0]].weight[:, 1] = 0  # channel 1 unread by one reader only: kept, a map has one width
    small = channels.compact_model(masked, exportfile.input_shape(cfg))
    smods = dict(small.named_modules())
    assert small.conv1.out_channels == small.layer1[1].bn2.num_features == n - 1
    assert all(smods[c].in_channels == n - 1 for c in readers)
    with torch.no_grad():
        x = inputs(cfg)
        assert max_rel_diff(small(x), masked(x)) <= 1e-5


def test_constant_of_a_pruned_filter_is_folded_not_dropped():
    """A zero filter followed by BN outputs the BN shift, not zero: without the fold the outputs change."""
    masked, cfg = make("vgg16", "filter")
    small = channels.compact_model(masked, exportfile.input_shape(cfg))
    folded = [m for m in small.modules() if isinstance(m, channels.FoldedConv2d)]
    assert folded
    x = inputs(cfg)
    with torch.no_grad():
        for m in folded:
            m.const_kernel.zero_()
        assert max_rel_diff(small(x), masked(x)) > 1e-3


# --------------------------------------------------------------------------- identity, sparse storage

@pytest.mark.parametrize("arch", list(SETUPS))
def test_export_of_unpruned_model_is_identity(arch, tmp_path):
    masked, cfg = make(arch, ratio=0)
    small, exp, _ = roundtrip(masked, cfg, tmp_path)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in masked.state_dict().items()}
    assert not any(isinstance(m, channels.FoldedConv2d) for m in small.modules())
    x = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(small(x), masked(x))


def bits(t):
    """Bit pattern of a float tensor, with -0.0 read as +0.0 (masking a negative weight gives -0.0)."""
    return (t + 0.0).view(torch.int32) if t.is_floating_point() else t


@pytest.mark.parametrize("arch", list(SETUPS))
def test_sparse_storage_round_trips_bit_exactly(arch, tmp_path):
    masked, cfg = make(arch, "irregular", ratio=0.8)
    small, exp, path = roundtrip(masked, cfg, tmp_path, "sparse")
    assert exp["sparse"], "no tensor was stored sparse"
    # The compact model's weights: irregular pruning at 80 % leaves some output-layer columns all
    # zero, so a few unread channels are gone; every other weight is the masked model's.
    ref, _ = channels.compact_state(masked, exportfile.input_shape(cfg))
    assert small.state_dict().keys() == ref.keys()
    for name, t in small.state_dict().items():
        assert torch.equal(bits(t), bits(ref[name])), name
    _, _, dense_path = roundtrip(masked, cfg, tmp_path, "compact")
    assert os.path.getsize(path) < 0.5 * os.path.getsize(dense_path)


@pytest.mark.parametrize("density,encoding", [(0.5, "bitmask"), (0.01, "index"), (0.0, "index"), (1.0, "bitmask")])
def test_sparse_encoding_round_trip(density, encoding):
    t = torch.randn(7, 5, 3, 3)
    t[torch.rand(t.shape) >= density] = 0
    entry = storage.encode_sparse(t)
    assert encoding in entry and len(entry["values"]) == int((t != 0).sum())
    assert torch.equal(bits(storage.decode_sparse(entry)), bits(t))


# --------------------------------------------------------------------------- file format

def test_export_is_plain_data_loadable_weights_only(tmp_path):
    masked, cfg = make("resnet18", "filter")
    _, _, path = roundtrip(masked, cfg, tmp_path)
    exp = torch.load(path, weights_only=True)
    assert exp["format"] == exportfile.FORMAT and exp["config"] == cfg and exp["arch"] == "resnet18"

    def leaves(o):
        if isinstance(o, dict):
            return [x for v in o.values() for x in leaves(v)]
        return [x for v in o for x in leaves(v)] if isinstance(o, (list, tuple)) else [o]
    assert all(isinstance(v, (torch.Tensor, str, int, float, bool, type(None))) for v in leaves(exp))
    assert exp["shapes"]["layer1.0.conv1.weight"] == list(exp["state"]["layer1.0.conv1.weight"].shape)


def _corrupt(kind, exp, path):
    if kind == "truncated":
        save_checkpoint(exp, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return
    if kind == "pickled module":
        torch.save(nn.Linear(2, 2), path)
        return
    if kind == "not an export":
        exp = {"model": {}, "something": 1}
    elif kind == "wrong version":
        exp["version"] = 99
    elif kind == "missing tensor":
        del exp["state"]["conv2.bias"]
    elif kind == "wrong shape":  # each layer fine on its own, but conv2 no longer reads conv1's output
        exp["state"]["conv2.weight"] = exp["state"]["conv2.weight"][:, :1]
        exp["shapes"]["conv2.weight"] = list(exp["state"]["conv2.weight"].shape)
    elif kind == "shapes disagree":
        exp["shapes"]["conv1.bias"] = [3]
    elif kind == "bad sparse entry":
        entry = next(iter(exp["sparse"].values()))
        entry["values"] = entry["values"][:-1]
    elif kind == "no state":
        del exp["state"]
    save_checkpoint(exp, path)


@pytest.mark.parametrize("kind,message", [
    ("truncated", "not a valid weights-only"), ("pickled module", "not a valid weights-only"),
    ("not an export", "neither a checkpoint nor an export"), ("wrong version", "version 99"),
    ("missing tensor", "'conv2.bias'"), ("wrong shape", "do not make a lenet model"),
    ("shapes disagree", "'conv1.bias' has shape"), ("bad sparse entry", "values for"), ("no state", "'state'")])
def test_malformed_export_is_refused_with_one_line(kind, message, tmp_path):
    masked, cfg = make("lenet", "irregular", ratio=0.9)
    path = str(tmp_path / "bad.pt")
    _corrupt(kind, exportfile.export_model(masked, cfg, "sparse" if kind == "bad sparse entry" else "compact"), path)
    with pytest.raises(UserError) as e:
        formats.load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- figures and the script

def test_macs_of_lenet_by_hand():
    masked, cfg = make("lenet", ratio=0)  # w=2: conv 4 -> conv 8 -> fc 128 -> 10 on 28x28
    f = measure.count(masked, exportfile.input_shape(cfg))
    assert f["macs"] == 4 * 25 * 28 * 28 + 8 * 4 * 25 * 14 * 14 + 8 * 49 * 128 + 128 * 10
    assert f["params"] == sum(p.numel() for p in masked.parameters())


def test_export_script_on_a_checkpoint(tmp_path):
    masked, cfg = make("lenet", "filter", ratio=0.75)
    ckpt = tmp_path / "retrain.pt"
    save_checkpoint({"stage": "retrain", "epoch": 1, "arch": "lenet", "width": 2, "dataset": "demo", "config": cfg,
                     "model": masked.state_dict(), "masks": None}, str(ckpt))
    out, js = tmp_path / "model.export.pt", tmp_path / "fig.json"
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", str(ckpt), "--out", str(out), "--json", str(js)]
    proc = forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "channels kept: conv1 1/4, conv2 2/8, fc1 32/128" in proc.stdout
    assert os.path.getsize(out) < os.path.getsize(ckpt) / 3
    model, cfg2, meta = formats.load_model(str(out))
    assert meta["format"] == "export" and meta["compression"]["bytes"]["export"] == os.path.getsize(out)
    assert meta["sparsity"]["type"] == "filter" and cfg2 == cfg
    again = forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=script_env())  # no silent overwrite
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx", "--out", "x.pt"], "--out x.pt names a torch file but --format is onnx; give --out a .onnx"),
    (["--format", "torch", "--out", "x.onnx"], "--out x.onnx names a onnx file but --format is torch"),
    (["--format", "safetensors", "--out", "x.export.pt"], "give --out a .safetensors name"),
    (["--bogus"], "unrecognized arguments: --bogus (see"),
    (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
])
def test_export_flags_are_one_line_and_the_suffix_must_fit_the_format(args, message, tmp_path, capsys):
    export = importlib.import_module("export")
    with pytest.raises(SystemExit) as e:
        run_cli(export.main, ["--ckpt", os.path.join(ROOT, "tests", "golden", "retrain.pt"), *args])
    line, = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in line and not os.path.exists("x.pt") and not os.path.exists("x.onnx")


def test_export_of_a_stored_config_out_of_range_is_refused(tmp_path, capsys):
    ckpt = torch.load(os.path.join(ROOT, "tests", "golden", "retrain.pt"), weights_only=True)
    ckpt["config"]["adv"]["eps"] = float("nan")
    save_checkpoint(ckpt, str(tmp_path / "c.pt"))
    with pytest.raises(SystemExit):
        run_cli(importlib.import_module("export").main, ["--ckpt", str(tmp_path / "c.pt"), "--no-latency"])
    assert "its stored config is not valid: adv.eps: expected a finite number" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c.pt"]


class _NoGroups(nn.Module):
    """A test-only architecture (logistic regression) that declares no channel groups."""

    def __init__(self, width, num_classes, in_channels, image_size, normalize):
        super().__init__()
        self.normalize, self.fc = normalize, nn.Linear(in_channels * image_size ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.normalize(x).flatten(1))


@pytest.mark.parametrize("arch", ["no_groups", "lenet"])
def test_eval_runs_any_architecture_and_adds_compact_figures_where_declared(arch, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models.base, "REGISTRY", dict(models.base.REGISTRY))  # the test architecture leaves with the test
    models.register("no_groups")(_NoGroups)
    cfg = load_config(None, [f"model.arch={arch}", "model.width=2", "prune.sparsity_type=filter"])
    model = model_from_config(cfg, INFO["demo"], "cpu")
    cfg["prune"]["prune_ratios"] = {"fc.weight" if arch == "no_groups" else "conv2.weight": 0.5}
    admm.hard_prune(admm.prunable_weights(model), admm.resolve_ratios(model, cfg["prune"]["prune_ratios"]), "filter")
    ckpt, js = tmp_path / "retrain.pt", tmp_path / "eval.json"
    save_checkpoint({"stage": "retrain", "epoch": 1, "arch": arch, "width": 2, "dataset": "demo", "config": cfg,
                     "model": model.state_dict(), "masks": None}, str(ckpt))
    importlib.import_module("eval").main(["--ckpt", str(ckpt), "--attacks", "natural,pgd", "--steps", "1",
                                          "--limit", "20", "--no-checks", "--device", "cpu", "--json", str(js)])
    out, rep = capsys.readouterr().out, json.loads(js.read_text())
    assert rep["n_examples"] == 20 and set(rep["accuracy"]) == {"natural", "pgd"}
    assert rep["sparsity"]["overall"] == 0.5  # the pruned layer's report does not need channel groups
    if arch == "no_groups":
        with pytest.raises(ValueError, match="no channel groups known for _NoGroups"):
            exportfile.export_model(model, cfg)
        assert rep["compression"] is None and "parameters" not in out
        assert "compact figures skipped: no_groups declares no channel groups" in out
    else:
        assert rep["compression"]["params"]["compact"] < rep["compression"]["params"]["dense"]
        assert "skipped" not in out and "channels kept: conv1 4/4, conv2 4/8, fc1 128/128" in out
