"""Evaluate a checkpoint: per-layer sparsity, accuracy under attack, worst case, sanity checks.

    python eval.py --ckpt runs/demo/retrain.pt [--attacks natural,fgsm,pgd,pgd_cw,pgd_l2,autoattack,apgd,...]
                   [--eps E] [--steps K] [--step-size A] [--restarts R] [--eps-l2 E2]
                   [--eps-sweep 0,0.05,...] [--plot FILE] [--no-checks] [--limit N] [--json FILE] [--seed S]

Arch, width, dataset, prune settings and attack defaults come from the config stored in the checkpoint.
``autoattack`` is the AutoAttack authors' standard version (package pyautoattack); ``apgd`` its
cheaper APGD-CE + APGD-T part; ``*_l2`` are the L2 versions at the --eps-l2 radius.
"""
import common  # noqa: F401 - first: the commands' preamble (common.py)
import os

import data as data_lib
from deploy import formats
from deploy import measure
from models import outside
from common import ArgumentParser, UserError, atomic_write, get_device, run_cli, write_json
from config import add_model_flags, check_stored, check_value, parse_float, user_config
from evaluation.accuracy import ATTACKS, check_attacks, standard_attacks, sweep_attacks
from evaluation.report import SEED, final_report, format_report


def plot_sweep(rep, path, title, num_classes):
    """Robust accuracy vs eps, one line per attack, chance dashed, as a PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    sw = rep["eps_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, accs in sw["accuracy"].items():
        ax.plot(sw["eps"], accs, marker="o", label=name)
    ax.axhline(1 / num_classes, color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlabel="eps (L-inf, pixel units in [0, 1])", ylabel="robust accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # whole or not at all, like every file written
    plt.close(fig)


def parse(argv=None):
    """The command line, checked before any work: the argparse namespace, with ``eps``,
    ``step_size`` and ``eps_l2`` as floats (None: the checkpoint's config), ``sweep_eps`` the
    sorted radii of ``--eps-sweep`` and ``names`` the attacks. A bad flag is a one-line
    ``UserError`` naming it."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(p, "checkpoint written by main.py / adv_main.py, an export, or outside weights (a state dict "
                       "in .pt or .safetensors; HYDRA, HARP, RobustBench)")
    p.add_argument("--attacks", default="natural,fgsm,pgd", help=f"comma-separated, any of: {', '.join(ATTACKS)}")
    p.add_argument("--eps", help="L-inf radius in [0,1] pixel units, e.g. 0.3 or 8/255 (default: config adv.eps)")
    p.add_argument("--steps", type=int, help="PGD steps (default: config eval.steps)")
    p.add_argument("--step-size", help="L-inf PGD step size (default: config eval.step_size)")
    p.add_argument("--restarts", type=int, help="PGD restarts (default: config eval.restarts)")
    p.add_argument("--eps-l2", help="L2 radius of pgd_l2, autoattack_l2 and apgd_l2 in pixel units (default 0.5 on "
                                    "cifar10, 2.0 otherwise); pgd_l2's step size is 2.5 * eps_l2 / steps")
    p.add_argument("--eps-sweep", help="comma-separated L-inf radii, e.g. 0,0.05,0.1,0.2,0.3: robust accuracy of "
                                       "the L-inf attacks in --attacks at each, to the JSON and a PNG plot")
    p.add_argument("--plot", help="PNG of the eps sweep (default: the --json path with .png, else eps_sweep.png)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the three extra PGD runs of the sanity checks (eps/2, eps=1, 2x steps + 1 restart)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N test examples (default: all)")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="evaluate on the test set (default) or on the validation split the run held out of its "
                        "training set (its data.val_size): what choices between runs read")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.add_argument("--device", help="override the config's device (auto, cpu, cuda)")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the attacks' random starts (default {SEED}, "
                   "as in the training scripts' final report)")
    args = p.parse_args(argv)
    for flag, key in (("--steps", "eval.steps"), ("--restarts", "eval.restarts"), ("--limit", "eval.limit")):
        if getattr(args, flag[2:]) is not None:
            check_value(key, getattr(args, flag[2:]), flag)
    args.eps, args.step_size, args.eps_l2 = (
        None if v is None else check_value(key, parse_float(v, flag), flag)
        for v, flag, key in ((args.eps, "--eps", "adv.eps"), (args.step_size, "--step-size", "eval.step_size"),
                             (args.eps_l2, "--eps-l2", "eval.step_size")))  # an L2 radius: > 0, unbounded
    args.sweep_eps = sweep_eps = sorted({check_value("adv.eps", parse_float(v, "--eps-sweep"), "--eps-sweep")
                                         for v in args.eps_sweep.split(",") if v.strip()}) if args.eps_sweep else []
    if args.eps_sweep is not None and not sweep_eps:
        raise UserError("--eps-sweep: give comma-separated radii, e.g. 0,0.1,0.2")
    if sweep_eps:
        try:
            import matplotlib  # noqa: F401 - checked before any work, not after the sweep
        except ImportError:
            raise UserError("--eps-sweep plots with matplotlib: pip install matplotlib") from None
    args.names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not args.names:
        raise UserError(f"--attacks: give at least one of {', '.join(ATTACKS)}")
    return args


def attacks_of(args, cfg):
    """(attacks, checks, sweep) that ``parse``'s ``args`` ask for, with ``cfg``'s defaults (see
    ``evaluation.report``)."""
    eps, steps, step_size, restarts = args.eps, args.steps, args.step_size, args.restarts
    attacks = standard_attacks(cfg, args.names, eps, steps, step_size, restarts, args.eps_l2)
    checks = {} if args.no_checks else check_attacks(standard_attacks(cfg, ["pgd"], eps, steps, step_size, restarts)["pgd"])
    sweep = sweep_attacks(cfg, args.names, args.sweep_eps, eps, steps, step_size, restarts) if args.sweep_eps else {}
    return attacks, checks, sweep


def main(argv=None):
    args = parse(argv)
    model, cfg, meta = formats.load_model(args.ckpt, cfg=user_config(args))  # a checkpoint, outside weights or an export
    cfg = check_stored(cfg, args.ckpt)  # adv.eps: .nan in a stored config is refused before any attack
    device = get_device(args.device or cfg["device"])
    attacks, checks, sweep = attacks_of(args, cfg)
    _, val, test, info = data_lib.load_splits(cfg)
    if args.split == "val":
        if not len(val.labels):
            raise UserError(f"--split val: {args.ckpt} was trained with no validation split (data.val_size 0)")
        test = val  # the report's "test" examples are the held-out training images
    model.to(device)
    rep = final_report(model, cfg, test, device, attacks, meta, args.limit, args.seed, checks, sweep, path=args.ckpt)
    if args.split == "val":
        rep["split"] = "val"  # read by a choice between runs; the test report has no such key
    if sweep:
        plot = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else "eps_sweep.png")
        plot_sweep(rep, plot, f"{os.path.basename(args.ckpt)}: {rep['n_examples']} test examples",
                   info.num_classes)
        rep["eps_sweep"]["plot"] = plot
    print(f"{args.ckpt}: {meta['stage']} stage, {cfg['model']['arch']} w={cfg['model']['width']}, "
          f"{cfg['data']['dataset']}")
    if meta.get("masks"):  # HYDRA's or HARP's scores, read as masks
        print(outside.describe_masks(meta["masks"]))
    print(format_report(rep))
    if meta["compression"] is None:
        print(f"compact figures skipped: {cfg['model']['arch']} declares no channel groups (models/: channel_groups)")
    else:
        print(measure.format_figures(meta["compression"]))
    if sweep:
        print(f"eps sweep plot: {rep['eps_sweep']['plot']}")
    if args.json:
        write_json(args.json, rep)


if __name__ == "__main__":
    run_cli(main)
