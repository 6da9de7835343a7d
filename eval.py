"""Evaluate a checkpoint: per-layer sparsity and accuracy under attack.

    python eval.py --ckpt runs/demo/retrain.pt [--attacks natural,fgsm,pgd] [--eps E] [--steps K]
                   [--step-size A] [--restarts R] [--limit N] [--json FILE]

Arch, width, dataset, prune settings and attack defaults come from the config stored in the checkpoint.
"""
import argparse
import json
import sys

import data as data_lib
from common import UserError, get_device, load_checkpoint, seed_everything
from config import parse_float
from evaluation import format_report, load_weights, model_from_config, report, standard_attacks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by main.py / adv_main.py")
    p.add_argument("--attacks", default="natural,fgsm,pgd", help="comma-separated: natural, fgsm, pgd")
    p.add_argument("--eps", help="L-inf radius in [0,1] pixel units, e.g. 0.3 or 8/255 (default: config adv.eps)")
    p.add_argument("--steps", type=int, help="PGD steps (default: config adv.steps)")
    p.add_argument("--step-size", help="PGD step size (default: config adv.step_size)")
    p.add_argument("--restarts", type=int, help="PGD restarts (default: config adv.restarts)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N test examples (default: all)")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--device", help="override the config's device (auto, cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed for PGD's random start (default 0)")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        cfg = ckpt["config"]
        device = get_device(args.device or cfg["device"])
        if (args.steps is not None and args.steps < 0) or (args.restarts is not None and args.restarts < 1):
            raise UserError("--steps must be >= 0 and --restarts >= 1")
        if args.limit < 0:
            raise UserError("--limit must be >= 0")
        eps = None if args.eps is None else parse_float(args.eps, "--eps")
        step_size = None if args.step_size is None else parse_float(args.step_size, "--step-size")
        if (eps is not None and eps < 0) or (step_size is not None and step_size < 0):
            raise UserError("--eps and --step-size must be >= 0")
        attacks = standard_attacks(cfg, [a.strip() for a in args.attacks.split(",") if a.strip()],
                                   eps, args.steps, step_size, args.restarts)
        _, test, info = data_lib.load_data(cfg)
        model = model_from_config(cfg, info, device)
        load_weights(model, ckpt, args.ckpt, cfg)
        seed_everything(args.seed)
        rep = report(model, cfg, test, device, attacks, args.limit)
        rep["checkpoint"] = {"path": args.ckpt, "stage": ckpt.get("stage"), "adversarial": ckpt.get("adversarial")}
        print(f"{args.ckpt}: {ckpt.get('stage')} stage, {cfg['model']['arch']} w={cfg['model']['width']}, "
              f"{cfg['data']['dataset']}")
        print(format_report(rep))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
