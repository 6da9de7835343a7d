"""Quantized models in the report and the export: packed codes round-trip bit for bit,
the export of a 4-bit pruned LeNet is smaller than its float export, eval.py reports bits,
distinct values, scales and storage bits, and the round-to-nearest baseline (quantize.epochs=0)."""
import importlib
import json
import math
import os
import sys

import pytest
import torch

import admm
from deploy import channels
from deploy import exportfile
from deploy import formats
from pruning import quant
from deploy import storage
from common import save_checkpoint
import forkserver
from helpers import ROOT, checkpoint, quantized_lenet, script_env


def inputs(n=16):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- packed codes

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 16])
def test_codes_pack_into_b_bits_each_and_unpack_exactly(bits):
    L = quant.top_code(bits)
    n = 37
    codes = torch.randint(-L, L + 1, (n,)).float()
    if bits == 1:
        codes = torch.where(codes >= 0, 1.0, -1.0)
    codes[:2] = torch.tensor([-L, L]).float()  # the extremes
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(quant.unpack_codes(packed, bits, n), codes)
    with pytest.raises(ValueError, match="range"):
        quant.pack_codes(torch.tensor([L + 1.0]), bits)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_levels_of_a_projected_tensor_give_it_back_bit_for_bit_with_or_without_the_scale(bits):
    w, mask = torch.randn(40, 30), torch.rand(40, 30) > 0.6
    codes, q = quant.quantize(w, bits, mask)
    z = quant.project(w, bits, mask)
    for scale in (q, None):
        c, s = quant.levels_of(z, bits, scale)
        assert torch.equal(c * s, z) and c.abs().max() <= quant.top_code(bits)
    assert quant.levels_of(w, bits) is None  # a float tensor is on no levels


# --------------------------------------------------------------------------- the export

@pytest.mark.parametrize("bits,ratio", [("4", 0.5), ("1", 0.5), ("2", 0.9), ("8", 0.0)])
def test_quantized_export_gives_the_checkpoints_outputs_exactly(bits, ratio, tmp_path):
    """Bit for bit the float export's compact model; and the checkpoint's outputs exactly when no
    channel is removed (a removed channel changes the order of the sums, as in any export)."""
    model, cfg, masks, _, ckpt = quantized_lenet(ratio, bits)
    exp, _ = exportfile.export_checkpoint(ckpt, "quantize.pt")
    assert exp["version"] == 2 and set(exp["quantized"]) == set(admm.prunable_weights(model))
    assert all(e["codes"].dtype == torch.uint8 for e in exp["quantized"].values())
    path = str(tmp_path / "q.export.pt")
    save_checkpoint(exp, path)
    small, _, _ = formats.load_exported(path)
    floats, _ = exportfile.model_from_export(exportfile.export_checkpoint(ckpt | {"stage": "retrain"}, "retrain.pt")[0])
    assert small.state_dict().keys() == floats.state_dict().keys()
    for k, v in floats.state_dict().items():
        assert torch.equal(small.state_dict()[k], v), k
    with torch.no_grad():
        out, ref = small(inputs()), model(inputs())
    assert torch.equal(out, floats.eval()(inputs()))
    if all(k == n for k, n in exp["channels"].values()):
        assert torch.equal(out, ref)
    else:  # 2 bits at 90 %: whole fc1 units round to zero and leave
        assert bits == "2" and (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_export_without_the_recorded_scales_finds_them(tmp_path):
    model, cfg, masks, _, ckpt = quantized_lenet()
    recorded = ckpt["convergence"]["quantize"]["scale"]
    ckpt["convergence"] = {}
    exp, _ = exportfile.export_checkpoint(ckpt, "quantize.pt")
    assert {n: e["scale"] for n, e in exp["quantized"].items()} == recorded


def test_4_bit_pruned_lenet_export_is_smaller_than_the_sparse_float_export(tmp_path, capsys):
    model, cfg, masks, before, ckpt = quantized_lenet(0.75, "4")
    qpath, fpath = str(tmp_path / "quantize.pt"), str(tmp_path / "retrain.pt")
    save_checkpoint(ckpt, qpath)
    float_exp, _ = exportfile.export_checkpoint(ckpt | {"stage": "retrain"}, fpath)  # same weights, stored as floats
    save_checkpoint(float_exp, fpath)
    assert float_exp["version"] == 1 and "quantized" not in float_exp and float_exp["storage"] == "sparse"
    out, js = tmp_path / "q.export.pt", tmp_path / "fig.json"
    importlib.import_module("export").main(["--ckpt", qpath, "--out", str(out), "--json", str(js), "--no-latency"])
    fig, printed = json.loads(js.read_text()), capsys.readouterr().out
    assert os.path.getsize(out) < 0.6 * os.path.getsize(fpath)
    assert fig["bytes"]["export"] == os.path.getsize(out)
    # the float export of the same checkpoint, but for its source record (path, stage): a few bytes
    assert abs(fig["bytes"]["float_export"] - os.path.getsize(fpath)) < 256
    sb = fig["storage_bits"]
    assert sb["export"] < sb["float_export"] / 4 < sb["dense_float32"] / 4
    assert "smaller than the float export (sparse, torch)" in printed and "quantized layers as packed codes" in printed
    # plain data, as every export: weights_only loads it
    exp = torch.load(out, weights_only=True)

    def leaves(o):
        return [x for v in o.values() for x in leaves(v)] if isinstance(o, dict) else \
            [x for v in o for x in leaves(v)] if isinstance(o, (list, tuple)) else [o]
    assert all(isinstance(v, (torch.Tensor, str, int, float, bool, type(None))) for v in leaves(exp))


def test_storage_bits_by_hand():
    # 16 weights, 3 nonzero at 4 bits: codes 3 x 4 bits -> 2 bytes; a bitmask (2 bytes) beats 3 int32
    # indices (12 bytes); 2 + 2 = 4 bytes sparse against 8 bytes of dense codes; + 4 bytes of scale.
    w = torch.zeros(4, 4)
    w[0, 1], w[2, 3], w[3, 0] = 0.5, -1.5, 3.5
    entry = storage.encode_quantized(w, 4)
    assert entry["scale"] == 0.5 and "bitmask" in entry and entry["codes"].numel() == 2
    assert storage.quantized_nbytes(entry) == 8
    assert torch.equal(storage.decode_quantized(entry), w)
    exp = {"state": {"fc.bias": torch.zeros(3)}, "sparse": {}, "quantized": {"fc.weight": entry}}
    assert exportfile.payload_bits(exp) == 8 * (3 * 4 + 8)
    # the LeNet export (of its compact model: 7 fc1 units unread, removed): float tensors at 32 bits,
    # each quantized layer a float32 scale and the smaller of 4 bits per code (whole bytes) and 4 bits
    # per nonzero code + a bitmask or int32 indices, whichever is smaller
    model, cfg, masks, _, ckpt = quantized_lenet(0.75, "4")
    exp, _ = exportfile.export_checkpoint(ckpt, "quantize.pt")
    state, _ = channels.compact_state(model, exportfile.input_shape(cfg))
    by_hand = 0
    for k, t in state.items():
        if k in exp["quantized"]:
            n, nnz = t.numel(), int((t != 0).sum())
            by_hand += 32 + 8 * min(math.ceil(4 * n / 8), math.ceil(4 * nnz / 8) + min(math.ceil(n / 8), 4 * nnz))
        else:
            by_hand += 8 * t.numel() * t.element_size()
    assert exp["figures"]["storage_bits"]["export"] == by_hand


def test_a_bad_quantized_entry_is_refused():
    """(That old, version-1 exports still load is tested on a checked-in one: test_golden.py.)"""
    model, cfg, masks, before, ckpt = quantized_lenet()
    assert exportfile.export_checkpoint(before, "retrain.pt")[0]["version"] == 1  # a float export is still version 1
    exp, _ = exportfile.export_checkpoint(ckpt, "quantize.pt")
    entry = next(iter(exp["quantized"].values()))
    entry["codes"] = entry["codes"][:-1]
    with pytest.raises(Exception, match="quantized entry .*uint8 bytes"):
        exportfile.model_from_export(exp)


# --------------------------------------------------------------------------- eval.py's report

def run_eval(path, tmp_path, capsys):
    js = tmp_path / f"{os.path.basename(path)}.json"
    importlib.import_module("eval").main(["--ckpt", str(path), "--attacks", "natural", "--limit", "20",
                                          "--no-checks", "--device", "cpu", "--json", str(js)])
    return json.loads(js.read_text()), capsys.readouterr().out


# Planted levels: each layer's kept weights are codes * q for a scale q and codes in -7..7 chosen
# here, with 7 and -7 among them, so its scale is q and its distinct values are the codes used.
PLANTED = {"conv1.weight": 0.0625, "conv2.weight": 0.03125, "fc1.weight": 0.005, "fc2.weight": 0.1}


def test_eval_reports_bits_values_scales_and_storage_of_the_quantized_layers(tmp_path, capsys):
    model, cfg, masks, before, ckpt = quantized_lenet(0.75, "4")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, w in admm.prunable_weights(model).items():
            codes = torch.randint(-7, 8, w.shape, generator=g).float()
            codes.view(-1)[masks[n].view(-1).nonzero()[:2].flatten()] = torch.tensor([7.0, -7.0])
            w.copy_(codes * PLANTED[n] * masks[n])
    ckpt = checkpoint(model, cfg, masks, "quantize")  # no recorded scales: found from the weights alone
    save_checkpoint(ckpt, str(tmp_path / "quantize.pt"))
    rep, out = run_eval(tmp_path / "quantize.pt", tmp_path, capsys)
    assert set(rep["quantization"]) == set(PLANTED)
    for n, q in rep["quantization"].items():
        w = admm.prunable_weights(model)[n]
        assert q["bits"] == 4 and q["scale"] == torch.tensor(PLANTED[n]).item()  # the float32 of the planted q
        assert q["distinct_nonzero"] == len((w / PLANTED[n]).round().unique()) - 1  # the planted codes but 0
    assert rep["storage_bits"]["export"] < rep["storage_bits"]["float_export"]
    assert "quantized layer" in out and "storage (codes" in out and not rep["warnings"]
    # the export reports the same layers, bits, values and scales, and the same accuracy
    exp, _ = exportfile.export_checkpoint(ckpt, str(tmp_path / "quantize.pt"))
    save_checkpoint(exp, str(tmp_path / "q.export.pt"))
    rep2, _ = run_eval(tmp_path / "q.export.pt", tmp_path, capsys)
    assert rep2["quantization"] == rep["quantization"] and rep2["accuracy"] == rep["accuracy"]


def test_eval_of_a_float_checkpoint_is_the_old_report(tmp_path, capsys):
    model, cfg, masks, before, ckpt = quantized_lenet()
    save_checkpoint(before, str(tmp_path / "retrain.pt"))  # quant.bits set, but an earlier stage: floats
    rep, out = run_eval(tmp_path / "retrain.pt", tmp_path, capsys)
    assert "quantization" not in rep and "quantized layer" not in out and "storage (codes" not in out
    assert "float_export" not in rep["compression"]["bytes"] and "float_export" not in rep["storage_bits"]
    # the float model's size in bits, for comparing it with quantized ones: the sparse float export's
    assert rep["storage_bits"]["export"] < rep["storage_bits"]["dense_float32"]


def test_storage_line_of_a_model_with_no_float_export_to_compare():
    """A quantize-stage checkpoint saved mid-ADMM (weights not yet on their levels) has no quantized
    layer in its export, so no float_export: the storage line still prints, without that ratio."""
    from evaluation.report import format_storage
    line = format_storage({"export": 1000, "dense_float32": 32000})
    assert "1,000 bits" in line and "32.00x less than dense float32" in line and "float export" not in line


def test_a_layer_with_too_many_values_is_a_warning(tmp_path, capsys):
    model, cfg, masks, before, ckpt = quantized_lenet()
    with torch.no_grad():
        model.fc1.weight.add_(1e-3 * torch.randn_like(model.fc1.weight) * masks["fc1.weight"])
    save_checkpoint(checkpoint(model, cfg, masks, "quantize"), str(tmp_path / "quantize.pt"))
    rep, out = run_eval(tmp_path / "quantize.pt", tmp_path, capsys)
    assert rep["quantization"]["fc1.weight"]["scale"] is None and rep["quantization"]["conv1.weight"]["scale"]
    assert any(w.startswith("fc1.weight: ") and "more than the 14 of 4 bits" in w for w in rep["warnings"])
    assert "WARNING: fc1.weight:" in out


# --------------------------------------------------------------------------- the round-to-nearest baseline

def test_round_to_nearest_baseline_is_the_quantize_stage_with_no_epochs(tmp_path):
    """quantize.epochs=0: no ADMM, no training; the stage's end puts the pruned weights on their
    levels with the same projection, so the result is quant.project of the pruned model."""
    model, cfg, masks, before, _ = quantized_lenet(0.75, "3")
    save_checkpoint(before, str(tmp_path / "pruned.pt"))
    out = tmp_path / "rtn"
    proc = forkserver.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--out", str(out),
                           "--stage", "quantize", "--init", str(tmp_path / "pruned.pt"),
                           "--set", "model.width=2", "--set", "quant.bits.*=3", "--set", "quantize.epochs=0",
                           "--set", "data.train_limit=64"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = torch.load(out / "quantize.pt", weights_only=True)
    for n, m in masks.items():
        assert torch.equal(final["model"][n], quant.project(before["model"][n], 3, m)), n
        assert quant.distinct_nonzero(final["model"][n]) <= 6 and torch.equal(final["masks"][n], m)
    assert "quantize: 0 epochs" in proc.stdout and "hard quantization:" in proc.stdout
