"""Export a pruned checkpoint as a deployable model: pruned channels removed, sparse weights stored sparse.

    python export.py --ckpt runs/demo/retrain.pt [--out FILE] [--format torch|safetensors|onnx]
                     [--storage compact|sparse] [--json FILE] [--overwrite] [--no-latency] [--threads N]

The file format (``formats.FORMATS``): ``torch`` (the default, or from --out's suffix
``.safetensors`` / ``.onnx``) and ``safetensors`` hold the export dict, read back by
``formats.load_exported`` and ``formats.load_model`` (which ``eval.py`` uses); ``onnx`` is
the compact model as a graph for onnxruntime. A checkpoint of the quantize stage is exported with
its quantized layers as packed integer codes plus one float32 scale per layer
(``storage.encode_quantized``; ONNX: dequantized); the report then also gives the size against
the float export of the same storage. The file is read back after writing and its outputs checked
against the masked model's; an ONNX graph is also checked on the test split (natural accuracy).
"""
import argparse

import common  # noqa: F401 - first: the commands' preamble (common.py)
import os

import torch

import data as data_lib
from deploy import exportfile
from deploy import formats
from deploy import measure
from common import ArgumentParser, UserError, reading, run_cli, write_json
from config import add_model_flags, check_stored, user_config
from evaluation.report import format_storage


def file_format(name):
    """--format's value: a name in ``formats.FORMATS``."""
    if name in exportfile.STORAGES:
        raise argparse.ArgumentTypeError(f"{name} is a storage: use --storage {name} "
                                         f"(--format picks the file: {', '.join(formats.FORMATS)})")
    if name not in formats.FORMATS:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(formats.FORMATS)}")
    return formats.FORMATS[name]


def format_for(path):
    """The format whose suffix ``path`` ends with (``.safetensors``, ``.onnx``), else torch."""
    return next((f for f in formats.FORMATS.values() if path.endswith(os.path.splitext(f.suffix)[1])),
                formats.FORMATS["torch"])


@torch.no_grad()
def test_accuracy(models, cfg):
    """({name: natural accuracy}, examples) of ``models`` ({name: callable}) on the first
    ``eval.limit`` examples of the test split (all when 0), as the training report counts them."""
    _, test, _ = data_lib.load_data(cfg)
    hits, n = {k: 0 for k in models}, 0
    for x, y in data_lib.batches(test, cfg["data"]["test_batch_size"], "cpu", limit=cfg["eval"]["limit"]):
        for k, m in models.items():
            hits[k] += int((m(x).argmax(1) == y).sum())
        n += len(y)
    return {k: h / max(n, 1) for k, h in hits.items()}, n


def parse(argv=None):
    """The command line, checked before any work; adds ``fmt`` (a ``formats.FORMATS`` entry) and
    ``out`` (the file to write). A bad flag is a one-line ``UserError`` naming it."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(p, "checkpoint written by main.py / adv_main.py, or outside weights (a state dict in .pt or "
                       ".safetensors; HYDRA, HARP, RobustBench)")
    p.add_argument("--out", help="file to write (default: the checkpoint's path with .export.pt, "
                                 ".export.safetensors, .export.pt2 or .export.onnx)")
    p.add_argument("--format", type=file_format, metavar="|".join(formats.FORMATS),
                   help="torch: torch.save of the export (default); safetensors: tensors + JSON header, loads "
                        "without running code; pt2: the compact model as a torch.export program; onnx: the compact "
                        "model as an ONNX graph (default: from --out's suffix)")
    p.add_argument("--storage", choices=exportfile.STORAGES,
                   help="compact: dense tensors of the smaller model; sparse: conv/linear weights as values + "
                        "bitmask or index (default: sparse for irregular pruning, compact for filter/column)")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch and onnxruntime (default 1: the steadiest figure on a shared machine)")
    args = p.parse_args(argv)
    args.fmt = fmt = args.format or format_for(args.out or "")
    if args.out and format_for(args.out) is not fmt:  # a file is read back by its suffix
        suffix = os.path.splitext(fmt.suffix)[1]
        raise UserError(f"--out {args.out} names a {format_for(args.out).name} file but --format is {fmt.name}; "
                        f"give --out a {suffix} name or drop --format")
    args.out = out = args.out or os.path.splitext(args.ckpt)[0] + fmt.suffix
    if os.path.abspath(out) == os.path.abspath(args.ckpt):
        raise UserError("--out must differ from --ckpt")
    if os.path.exists(out) and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    if fmt.storage and args.storage not in (None, fmt.storage):
        raise UserError(f"--format {fmt.name} stores {fmt.storage} tensors only; drop --storage {args.storage}")
    return args


def main(argv=None):
    """Export, read back, check, measure, and write ``--json``; a failure after the export was
    written removes it, so no half-finished result is left behind and the rerun needs no
    ``--overwrite``."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    ckpt = formats.read_checkpoint(args.ckpt, user_config(args), "export.py --ckpt")
    check_stored(ckpt["config"], args.ckpt)
    with reading(args.ckpt):
        exp, masked = exportfile.export_checkpoint(ckpt, args.ckpt, args.storage or args.fmt.storage,
                                                   args.fmt.quantized)
    args.fmt.write(args.out, exp, exportfile.model_from_export(exp, args.out)[0])
    try:
        fig = check_and_measure(args, ckpt, exp, masked, args.out)
        if args.json:
            write_json(args.json, fig)
    except BaseException:  # a failed check or --json (a full disk, a kill) leaves no half-finished result
        os.remove(args.out)
        raise


def check_and_measure(args, ckpt, exp, masked, path):
    """The figures of the export at ``path`` (``measure.figures``), its outputs checked against
    the masked model's, printed; a mismatch is a ``UserError``."""
    fmt, out, cfg = args.fmt, args.out, exp["config"]
    model = fmt.model(path, args.threads)  # what a user gets back, read from disk
    fig = measure.figures(exp, os.path.getsize(path), fmt.name)
    masked.eval()
    x = torch.rand(64, *exportfile.input_shape(cfg), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = masked(x), model(x)
    diff = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    same = bool((got.argmax(1) == ref.argmax(1)).all())
    fig["check"] = {"inputs": len(x), "max_rel_diff": diff, "same_predictions": same}
    s = ckpt.get("stage")
    print(f"{args.ckpt} ({s} stage, {cfg['model']['arch']} w={cfg['model']['width']}, {cfg['data']['dataset']}, "
          f"{cfg['prune']['sparsity_type']} pruning) -> {out}")
    print(measure.format_figures(fig))
    if "quantized" in exp:  # a quantized export: its layers as packed integer codes
        print("quantized layers as packed codes: " + ", ".join(
            f"{n} {e['bits']} bits" for n, e in exp["quantized"].items()))
        print(format_storage(fig["storage_bits"]))
    elif s == "quantize" and not fmt.quantized:
        print(f"quantized layers go out dequantized ({fmt.name} holds float32 weights: codes x scale)")
    print(f"check on {len(x)} random inputs: max |export - masked| / max |masked| = {diff:.2e}, "
          f"same predictions: {same}")
    accuracy_differs = False
    if fmt.runs_outside_torch:  # another runtime computes it: also the accuracy the user will see
        acc, n = test_accuracy({"masked": masked, "export": model}, cfg)
        fig["check"]["test_natural"] = {"examples": n, **acc}
        accuracy_differs = acc["masked"] != acc["export"]
        print(f"natural accuracy on {n} test examples: masked model (PyTorch) {acc['masked']:.4f}, "
              f"{fmt.name} export ({fmt.runtime}) {acc['export']:.4f}")
    if not args.no_latency:
        t = measure.latency({"dense": masked, "compact": model}, x)
        fig["latency"] = {"batch": len(x), "threads": torch.get_num_threads(), "dense_s": t["dense"],
                          "compact_s": t["compact"], "speedup": t["dense"] / t["compact"], "runtime": fmt.runtime}
        print(f"CPU latency, batch {len(x)}, {torch.get_num_threads()} threads (best of 5): masked dense (PyTorch) "
              f"{t['dense'] * 1e3:.1f} ms, compact ({fmt.runtime}) {t['compact'] * 1e3:.1f} ms, "
              f"speed-up {t['dense'] / t['compact']:.2f}x")
    if not diff <= 1e-5 or accuracy_differs:  # NaN is a mismatch
        raise UserError(f"the export's outputs differ from the masked model's (relative {diff:.2e}"
                        + (", and its test accuracy" if accuracy_differs else "")
                        + f"); removed {out}; please report this with the checkpoint")
    return fig


if __name__ == "__main__":
    run_cli(main)
