"""Saved formats against files and bytes fixed in advance, not against today's writer: packed
codes against bytes worked out by hand from the documented bit order, and a checkpoint and a
version-1 export written by an earlier version of the scripts (tests/golden/README.md)."""
import importlib
import json
import os

import pytest
import torch


from deploy import formats
from pruning import quant
from common import load_checkpoint

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


# --------------------------------------------------------------------------- packed codes
# quant.pack_codes: code c of a b-bit layer (top code L) is stored as u = (c + L) / step (step 2 at
# b = 1, else 1), in b bits, least significant bit first, code after code; the bit stream fills
# each byte from its least significant bit.
#
# 4 bits, L = 7: codes -7, 0, 7, 1 -> u = 0, 7, 14, 8 -> nibbles low first: byte 0 = 0x0 | 0x7 << 4
# = 0x70, byte 1 = 0xE | 0x8 << 4 = 0x8E.
# 3 bits, L = 3: codes 3, -3, 0 -> u = 6, 0, 3 -> bits 0,1,1 | 0,0,0 | 1,1,0 -> byte 0 = bits
# 0,1,1,0,0,0,1,1 = 2 + 4 + 64 + 128 = 0xC6, byte 1 = bit 0 of nothing left = 0x00.
# 1 bit: codes +1,-1,-1,+1,+1,+1,+1,+1,-1 -> u = 1,0,0,1,1,1,1,1,0 -> byte 0 = 1 + 8 + 16 + 32 + 64
# + 128 = 0xF9, byte 1 = 0x00.
# 2 bits, L = 1: codes -1, 0, 1, 1 -> u = 0, 1, 2, 2 -> 0b00 | 0b01 << 2 | 0b10 << 4 | 0b10 << 6 = 0xA4.
BY_HAND = [(4, [-7, 0, 7, 1], [0x70, 0x8E]), (3, [3, -3, 0], [0xC6, 0x00]),
           (1, [1, -1, -1, 1, 1, 1, 1, 1, -1], [0xF9, 0x00]), (2, [-1, 0, 1, 1], [0xA4])]


@pytest.mark.parametrize("bits,codes,expected", BY_HAND, ids=[f"{b}bit" for b, _, _ in BY_HAND])
def test_packed_codes_are_the_bytes_worked_out_by_hand(bits, codes, expected):
    packed = quant.pack_codes(torch.tensor(codes, dtype=torch.float32), bits)
    assert packed.tolist() == expected
    assert quant.unpack_codes(torch.tensor(expected, dtype=torch.uint8), bits, len(codes)).tolist() == codes


# --------------------------------------------------------------------------- files written before

@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(GOLDEN, "expected.json")) as f:
        return json.load(f)


def digits(n=8):
    import config
    import data
    _, test, _ = data.load_data(config.load_config(None))
    return test.images[:n].float() / 255, test.labels[:n]


def test_golden_checkpoint_loads_with_its_sparsity_and_outputs(expected):
    path = os.path.join(GOLDEN, "retrain.pt")
    ckpt = load_checkpoint(path)
    assert (ckpt["stage"], ckpt["arch"], ckpt["width"], ckpt["adversarial"]) == ("retrain", "lenet", 1, False)
    # The demo's ratios on LeNet w=1 (conv1 2x1x5x5, conv2 4x2x5x5, fc1 64x196, fc2 10x64), by hand:
    # round(0.5 * 50) = 25, round(0.8 * 200) = 160, round(0.9 * 12544) = round(11289.6) = 11290,
    # round(0.5 * 640) = 320 zeros, held by the masks.
    zeros = {"conv1.weight": 25, "conv2.weight": 160, "fc1.weight": 11290, "fc2.weight": 320}
    for n, z in zeros.items():
        assert int((ckpt["model"][n] == 0).sum()) == z and int((~ckpt["masks"][n]).sum()) == z, n
    model, cfg, meta = formats.load_model(path)  # eval.py's reader
    x, y = digits()
    assert y.tolist() == expected["labels"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(expected["logits"]), rtol=0, atol=1e-5)
    assert meta["format"] == "checkpoint" and meta["stage"] == "retrain"


def test_golden_version_1_export_loads_to_the_same_model(expected):
    path = os.path.join(GOLDEN, "retrain.export.pt")
    model, cfg, exp = formats.load_exported(path)
    assert exp["version"] == 1 and exp["storage"] == "sparse" and "quantized" not in exp
    assert exp["channels"]["fc1"][1] == 64 and model.fc1.weight.shape[0] == exp["channels"]["fc1"][0] < 64
    x, _ = digits()
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(expected["logits"]), rtol=0, atol=1e-5)
    again, _, meta = formats.load_model(path)
    assert meta["format"] == "export" and meta["sparsity"]["layers"][2]["nonzero"] == 12544 - 11290


# --------------------------------------------------------------------------- the format before the renames
# tests/golden/v2: an ADMM-stage checkpoint written with the "admm" (stage state) and "free_delta"
# (method state) keys, and a safetensors export, made by the code at 4423fe3; expected.json holds
# what that code computed from them: logits on the first 8 demo digits, and eval.py's accuracies.

V2 = os.path.join(GOLDEN, "v2")


@pytest.fixture(scope="module")
def expected_v2():
    with open(os.path.join(V2, "expected.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["admm.pt", "retrain.export.safetensors"])
def test_files_of_the_format_before_the_renames_give_the_same_logits_and_accuracies(name, expected_v2, tmp_path):
    path = os.path.join(V2, name)
    model, _, meta = formats.load_model(path)
    x, _ = digits()
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(expected_v2[name]["logits"]), rtol=0, atol=1e-5)
    assert meta["sparsity"]["overall"] == pytest.approx(expected_v2[name]["sparsity_overall"], abs=1e-12)
    out = tmp_path / "eval.json"
    importlib.import_module("eval").main(["--ckpt", path, "--attacks", "natural,pgd", "--limit", "200",
                                          "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["accuracy"] == expected_v2[name]["eval"]["accuracy"]
    assert rep["worst_case"] == expected_v2[name]["eval"]["worst_case"]


def test_old_state_keys_load_into_the_stage_and_the_method():
    from pruning.plan import make_stage
    from training.methods import make_method
    from training.state import TrainState
    import data
    from models import model_from_config
    ckpt = load_checkpoint(os.path.join(V2, "admm.pt"))
    assert "admm" in ckpt and "free_delta" in ckpt and "stage_state" not in ckpt  # the old names
    cfg = ckpt["config"]
    info = data.INFO[cfg["data"]["dataset"]]
    model = model_from_config(cfg, info, "cpu")
    _, stage = make_stage("admm", model, cfg, ckpt, "golden", load_checkpoint)
    state = TrainState(stage, model, make_method(cfg, True, info, "cpu"), cfg, torch.device("cpu"))
    state.load_state_dict(ckpt)
    for n, z in ckpt["admm"]["Z"].items():
        assert torch.equal(stage.admm.Z[n], z) and torch.equal(stage.admm.U[n], ckpt["admm"]["U"][n])
    assert torch.equal(state.method.state_dict(), ckpt["free_delta"]) and ckpt["free_delta"].abs().sum() > 0
    saved = state.state_dict()
    assert "admm" not in saved and "free_delta" not in saved
    assert torch.equal(saved["method_state"], ckpt["free_delta"])
