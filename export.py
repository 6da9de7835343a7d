"""Export a pruned checkpoint as a deployable model: pruned channels removed, sparse weights stored sparse.

    python export.py --ckpt runs/demo/retrain.pt --out runs/demo/retrain.export.pt [--format compact|sparse]
                     [--json FILE] [--overwrite] [--no-latency] [--threads N]

A checkpoint of the quantize stage is exported with its quantized layers as packed integer codes
plus one float32 scale per layer (``compact.encode_quantized``); the report then also gives the
size against the float export of the same storage. The export loads with
``torch.load(..., weights_only=True)`` and is rebuilt by ``compact.load_exported`` (or
``compact.load_model``, which also reads checkpoints). The export is read back after writing and
its outputs checked against the masked model's. See compact.py.
"""
import argparse
import os

# Before torch starts its OpenMP threads: let idle threads sleep instead of spin-waiting. On a
# busy CPU, spinning threads slowed a demo epoch 20x (119 s vs 6.6 s); set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import compact
from common import UserError, load_checkpoint, reading, run_cli, save_checkpoint, write_json
from evaluation import format_storage


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by main.py / adv_main.py")
    p.add_argument("--out", required=True, help="export file to write")
    p.add_argument("--format", choices=compact.STORAGES,
                   help="compact: dense tensors of the smaller model; sparse: conv/linear weights as values + "
                        "bitmask or index (default: sparse for irregular pruning, compact for filter/column)")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the steadiest figure on a shared machine)")
    args = p.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise UserError("--out must differ from --ckpt")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.ckpt)
    with reading(args.ckpt):
        exp, masked = compact.export_checkpoint(ckpt, args.ckpt, args.format)
    save_checkpoint(exp, args.out)
    model, cfg, exp = compact.load_exported(args.out)  # what a user gets back, read from disk
    fig = compact.figures(exp, os.path.getsize(args.out))

    masked.eval()
    x = torch.rand(64, *compact.input_shape(cfg), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = masked(x), model(x)
    diff = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    same = bool((out.argmax(1) == ref.argmax(1)).all())
    fig["check"] = {"inputs": len(x), "max_rel_diff": diff, "same_predictions": same}
    s = ckpt.get("stage")
    print(f"{args.ckpt} ({s} stage, {cfg['model']['arch']} w={cfg['model']['width']}, {cfg['data']['dataset']}, "
          f"{cfg['prune']['sparsity_type']} pruning) -> {args.out}")
    print(compact.format_figures(fig))
    if "quantized" in exp:  # a quantized export: its layers as packed integer codes
        print("quantized layers as packed codes: " + ", ".join(
            f"{n} {e['bits']} bits" for n, e in exp["quantized"].items()))
        print(format_storage(fig["storage_bits"]))
    print(f"check on {len(x)} random inputs: max |compact - masked| / max |masked| = {diff:.2e}, "
          f"same predictions: {same}")
    if not args.no_latency:
        t = compact.latency({"dense": masked, "compact": model}, x)
        fig["latency"] = {"batch": len(x), "threads": torch.get_num_threads(), "dense_s": t["dense"],
                          "compact_s": t["compact"], "speedup": t["dense"] / t["compact"]}
        print(f"CPU latency, batch {len(x)}, {torch.get_num_threads()} threads (best of 5): masked dense "
              f"{t['dense'] * 1e3:.1f} ms, compact {t['compact'] * 1e3:.1f} ms, "
              f"speed-up {t['dense'] / t['compact']:.2f}x")
    if diff > 1e-5:
        os.remove(args.out)
        raise UserError(f"the export's outputs differ from the masked model's (relative {diff:.2e}); "
                        f"removed {args.out}; please report this with the checkpoint")
    if args.json:
        write_json(args.json, fig)


if __name__ == "__main__":
    run_cli(main)
