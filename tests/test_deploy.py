"""Deployment formats (formats.FORMATS): ONNX graphs run by onnxruntime give the masked
PyTorch model's outputs, safetensors exports round-trip every export kind bit for bit, malformed
files are refused in one line, and each optional package, when missing, stops its path with one
line naming the install."""
import json
import math
import os
import sys

import pytest
import torch

import admm
from deploy import exportfile
from deploy import formats
from pruning import quant
from common import UserError, save_checkpoint
from config import load_config
from data import INFO, batches, load_data
from models import model_from_config
import forkserver
from helpers import ROOT, inputs, make, max_rel_diff, quantized_lenet, script_env

ONNX, SAFETENSORS = formats.FORMATS["onnx"], formats.FORMATS["safetensors"]


def demo_like():
    """(masked LeNet w=4 on the demo digits, irregular at the demo's ratios, random weights; cfg)."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["device=cpu"])
    model = model_from_config(cfg, INFO["demo"], "cpu")
    admm.hard_prune(admm.prunable_weights(model), admm.resolve_ratios(model, cfg["prune"]["prune_ratios"]), "irregular")
    return model.eval(), cfg


def onnx_roundtrip(masked, cfg, path):
    """(onnxruntime model of the ONNX export of ``masked``, the export dict)."""
    exp = exportfile.export_model(masked, cfg, "compact")
    ONNX.write(str(path), exp, exportfile.model_from_export(exp)[0])
    return ONNX.model(str(path)), exp


# --------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("case", ["demo-like lenet irregular", "vgg16 filter", "resnet18 filter", "resnet18 column"])
def test_onnx_graph_on_onnxruntime_gives_the_masked_models_outputs(case, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    if case.startswith("demo"):
        masked, cfg = demo_like()
    else:
        arch, scheme = case.split()
        masked, cfg = make(arch, scheme, 0.5)
    ort_model, exp = onnx_roundtrip(masked, cfg, tmp_path / "m.onnx")
    for n in (1, 5, 16):  # the batch axis is dynamic: any batch size runs
        x = inputs(cfg, n)
        with torch.no_grad():
            ref = masked(x)
        got = ort_model(x)
        assert got.shape == ref.shape and max_rel_diff(got, ref) <= 1e-5
    assert ref.std(0).max() > 1e-3 * ref.abs().max()  # outputs depend on the input: a real comparison
    if "filter" in case:  # the graph is the compact model: FoldedConv2d's constant kernels included
        assert exp["channels"] and any(k < n for k, n in exp["channels"].values())
        onnx = pytest.importorskip("onnx")
        graph = onnx.load(str(tmp_path / "m.onnx"))
        sizes = sum(math.prod(t.dims) for t in graph.graph.initializer)
        assert sizes < sum(p.numel() for p in masked.state_dict().values())  # fewer weights than the dense model
        meta = json.loads({p.key: p.value for p in graph.metadata_props}[exportfile.FORMAT])
        assert meta["arch"] == cfg["model"]["arch"] and meta["channels"] == exp["channels"]


def test_onnx_of_a_quantized_model_is_dequantized_and_exact(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model, cfg, _, _, ckpt = quantized_lenet(0.5, "4")
    exp, masked = exportfile.export_checkpoint(ckpt, "quantize.pt", quantized=ONNX.quantized)
    assert "quantized" not in exp  # float32 values on the levels
    for name, w in exportfile.model_from_export(exp)[0].state_dict().items():
        if name in ckpt["model"] and name.endswith("weight") and w.shape == ckpt["model"][name].shape:
            assert quant.levels_of(w, 4) is not None  # still on its 4-bit levels
    ONNX.write(str(tmp_path / "q.onnx"), exp, exportfile.model_from_export(exp)[0])
    x = inputs(cfg)
    with torch.no_grad():
        assert max_rel_diff(ONNX.model(str(tmp_path / "q.onnx"))(x), masked.eval()(x)) <= 1e-5


def test_export_script_onnx_checks_test_accuracy_against_an_independent_count(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    masked, cfg = demo_like()
    cfg["eval"]["limit"] = 300
    ckpt = tmp_path / "retrain.pt"
    save_checkpoint({"stage": "retrain", "epoch": 1, "arch": "lenet", "width": 4, "dataset": "demo", "config": cfg,
                     "model": masked.state_dict(), "masks": None}, str(ckpt))
    js = tmp_path / "fig.json"
    proc = forkserver.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", str(ckpt), "--format", "onnx",
                           "--json", str(js), "--no-latency"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "retrain.export.onnx")  # the default --out
    # The masked model's natural accuracy counted here, by hand, on the same 300 test digits.
    _, test, _ = load_data(cfg)
    with torch.no_grad():
        hits = sum(int((masked(x).argmax(1) == y).sum()) for x, y in batches(test, 100, "cpu", limit=300))
    check = json.loads(js.read_text())["check"]
    assert check["test_natural"] == {"examples": 300, "masked": hits / 300, "export": hits / 300}
    assert f"masked model (PyTorch) {hits / 300:.4f}, onnx export (onnxruntime) {hits / 300:.4f}" in proc.stdout


def test_export_script_refuses_the_old_storage_spelling_and_storage_with_onnx(tmp_path):
    from export import main
    with pytest.raises(UserError, match="sparse is a storage: use --storage sparse"):  # one line, as eval.py's
        main(["--ckpt", "x.pt", "--format", "sparse"])
    with pytest.raises(UserError, match="drop --storage sparse"):
        main(["--ckpt", str(tmp_path / "x.pt"), "--format", "onnx", "--storage", "sparse"])


def test_eval_refuses_an_onnx_graph_in_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x08\x12\x07pytorch")  # how an ONNX ModelProto starts (ir_version 8)
    with pytest.raises(UserError, match="is an ONNX graph: run it with onnxruntime"):
        formats.load_model(str(path))


# --------------------------------------------------------------------------- safetensors

def _kinds():
    m, cfg = make("lenet", "irregular", 0.9)
    yield "sparse", exportfile.export_model(m, cfg, "sparse")
    m, cfg = make("resnet18", "filter", 0.5)
    yield "compact (filter, folded)", exportfile.export_model(m, cfg, "compact")
    _, _, _, _, ckpt = quantized_lenet(0.5, "4")
    yield "quantized sparse", exportfile.export_checkpoint(ckpt, "q.pt", "sparse")[0]
    _, _, _, _, ckpt = quantized_lenet(0.0, "2")
    yield "quantized compact", exportfile.export_checkpoint(ckpt, "q.pt", "compact")[0]


def _same(a, b, where="export"):
    """a == b, tensors bit for bit with their dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.numel() else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point and b.numel() else b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    else:
        assert json.loads(json.dumps(a)) == b, where  # JSON turns tuples into lists


def test_safetensors_round_trips_every_export_kind_bit_for_bit(tmp_path):
    pytest.importorskip("safetensors")
    seen = set()
    for kind, exp in _kinds():
        torch_path, st_path = str(tmp_path / "e.pt"), str(tmp_path / "e.safetensors")
        save_checkpoint(exp, torch_path)
        SAFETENSORS.write(st_path, exp)
        assert formats.format_of(st_path) is SAFETENSORS and formats.format_of(torch_path).name == "torch"
        back = SAFETENSORS.read(st_path)
        _same(exp, back)
        seen |= {k for k in ("sparse", "quantized") if back.get(k)}
        a, _, _ = formats.load_exported(torch_path)
        b, _, _ = formats.load_exported(st_path)
        x = torch.rand(8, *exportfile.input_shape(exp["config"]))
        with torch.no_grad():
            assert torch.equal(a(x), b(x)), kind
        _, _, meta = formats.load_model(st_path)
        assert meta["format"] == "export" and meta["compression"]["format"] == "safetensors"
        assert meta["compression"]["bytes"]["export"] == os.path.getsize(st_path)
        if "quantized" in kind:
            assert set(meta["quantization"]["layers"]) == set(exp["quantized"])
    assert seen == {"sparse", "quantized"}


def test_eval_reads_a_safetensors_export(tmp_path, capsys):
    pytest.importorskip("safetensors")
    import eval as eval_script
    m, cfg = make("lenet", "filter", 0.5)
    path = str(tmp_path / "m.safetensors")
    SAFETENSORS.write(path, exportfile.export_model(m, cfg, "compact"))
    eval_script.main(["--ckpt", path, "--attacks", "natural", "--limit", "20", "--no-checks", "--device", "cpu"])
    assert "export (compact, safetensors)" in capsys.readouterr().out


@pytest.mark.parametrize("kind,message", [
    ("truncated", "not a valid safetensors export"), ("no format", "holds weights without a config"),  # plain tensors: outside weights
    ("export not JSON", "not a valid safetensors export"), ("stray tensor", "has no place"),
    ("missing tensor", "'conv2.bias'")])
def test_malformed_safetensors_export_is_refused_with_one_line(kind, message, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m, cfg = make("lenet", "irregular", 0.9)
    path = str(tmp_path / "bad.safetensors")
    SAFETENSORS.write(path, exportfile.export_model(m, cfg, "compact"))
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    else:
        with st.safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if kind == "no format":
            del meta["format"]
        elif kind == "export not JSON":
            meta["export"] = "{'arch': 'lenet'"
        elif kind == "stray tensor":
            tensors["elsewhere/x"] = torch.zeros(1)
        else:
            del tensors["conv2.bias"]  # layout 2: the dense tensors under their own names
        st.save_file(tensors, path, metadata=meta)
    with pytest.raises(UserError) as e:
        formats.load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- optional packages missing

@pytest.mark.parametrize("missing,call,install", [
    ("onnx", lambda p: ONNX.write(p, {"config": {"data": {"dataset": "demo"}}}, None), "pip install onnx onnxscript onnxruntime"),
    ("onnxscript", lambda p: ONNX.write(p, {"config": {"data": {"dataset": "demo"}}}, None), "pip install onnx onnxscript onnxruntime"),
    ("onnxruntime", lambda p: ONNX.model(p), "pip install onnxruntime"),
    ("safetensors", lambda p: SAFETENSORS.write(p, {}), "pip install safetensors"),
    ("safetensors", lambda p: SAFETENSORS.read(p), "pip install safetensors"),
])
def test_a_missing_optional_package_stops_with_one_line(missing, call, install, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError, as when not installed
    if missing == "safetensors":
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError) as e:
        call(str(tmp_path / "x"))
    assert str(e.value).endswith(install) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "x")  # nothing written
