"""The shared pipeline behind ``main.py`` (natural training) and ``adv_main.py`` (PGD training).

Three stages, each one function call with the same signature (``train_stage``):

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2, updating Z and U every few epochs
    retrain   hard-prune W onto the sparsity set, then train with the masks held fixed

Each stage starts from the previous stage's checkpoint in the run folder (or ``--init``) and
writes ``<out>/<stage>.pt``. The two entry scripts differ only in the training attack.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import yaml

import admm as admm_lib
import data as data_lib
from attacks import PGD
from common import LOG, UserError, get_device, git_hash, load_checkpoint, save_checkpoint, seed_everything, setup_logging
from config import load_config
from evaluation import count_correct, evaluate, format_report, load_weights, model_from_config, progress, report, standard_attacks

STAGES = ("pretrain", "admm", "retrain")


# --------------------------------------------------------------------------- building blocks

def train_attack(cfg, adversarial):
    """The training adversary: PGD from ``cfg['adv']`` for adversarial training, else None."""
    if not adversarial:
        return None
    a = cfg["adv"]
    return PGD(a["eps"], a["step_size"], a["steps"], a["restarts"], a["random_start"])


def make_optimizer(params, scfg):
    if scfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=scfg["lr"], momentum=scfg["momentum"], weight_decay=scfg["weight_decay"])
    return torch.optim.Adam(params, lr=scfg["lr"], weight_decay=scfg["weight_decay"])


def lr_at(scfg, epoch):
    """Learning rate for ``epoch`` (0-based). Derived from the epoch, so resuming needs no
    scheduler state."""
    if scfg["schedule"] == "cosine":
        return scfg["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / max(scfg["epochs"], 1)))
    if scfg["schedule"] == "step":
        return scfg["lr"] * scfg["gamma"] ** sum(epoch >= m for m in scfg["milestones"])
    return scfg["lr"]


# --------------------------------------------------------------------------- one stage

def train_stage(stage, model, cfg, train, test, info, attack, device, out, init=None):
    """Run one stage on ``model`` (already holding its starting weights) and save ``<out>/<stage>.pt``.

    ``init`` is the checkpoint the stage starts from (None for pretraining from scratch); its
    masks are kept through the stage, so a pruned weight never comes back.
    Returns the checkpoint dict that was saved.
    """
    scfg, pcfg = cfg[stage], cfg["prune"]
    seed_everything(cfg["seed"] + STAGES.index(stage))
    weights = admm_lib.prunable_weights(model)
    ratios = admm_lib.resolve_ratios(model, pcfg["prune_ratios"])
    scheme = pcfg["sparsity_type"]
    optimizer = make_optimizer(model.parameters(), scfg)

    masks = dict(init["masks"]) if init and init.get("masks") else {}
    masks = {n: m.to(device) for n, m in masks.items()}
    admm_state = None
    if stage == "admm":
        if pcfg["masked_progressive"]:  # already-zero weights stay zero (progressive pruning)
            masks.update(admm_lib.nonzero_masks(weights, weights))
        admm_state = admm_lib.ADMM(weights, ratios, scheme, pcfg["rho"])
    elif stage == "retrain":
        # Hard pruning: W = Pi_S(W); the kept set is then frozen by the masks.
        pruned = admm_lib.hard_prune(weights, ratios, scheme)
        masks = {n: pruned[n] & masks[n] if n in masks else pruned[n] for n in {*masks, *pruned}}
    hook = admm_lib.attach_masks(optimizer, weights, masks) if masks else None

    LOG.info(f"== {stage}: {scfg['epochs']} epochs, {'PGD' if attack else 'natural'} training"
             + (f", {scheme} pruning of {len(ratios)} layers" if stage != "pretrain" else ""))
    LOG.info(f"{'stage':8} {'ep':>4} {'lr':>8} {'loss':>7} {'penalty':>8} {'tr_nat':>6} {'tr_adv':>6} "
             f"{'te_nat':>6} {'te_pgd':>6} {'resid':>6} {'time':>6}")
    eval_attack = standard_attacks(cfg, ["pgd"])["pgd"]
    row = {}
    for epoch in range(scfg["epochs"]):
        t0 = time.time()
        lr = lr_at(scfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        # Running sums stay on the device; one host sync per epoch, not per step.
        sums = torch.zeros(5, device=device)  # loss, penalty, natural correct, adversarial correct, n
        batches = data_lib.batches(train, cfg["data"]["batch_size"], device, shuffle=True,
                                   augment=info.augment, seed=cfg["seed"] * 1000 + epoch)
        for x, y in progress(batches, data_lib.num_batches(train, cfg["data"]["batch_size"]), f"{stage} {epoch + 1}"):
            x_train = attack(model, x, y) if attack else x
            logits = model(x_train)
            loss = F.cross_entropy(logits, y)
            penalty = admm_state.penalty(weights) if admm_state else torch.zeros((), device=device)
            optimizer.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            optimizer.step()
            with torch.no_grad():
                adv_correct = (logits.argmax(1) == y).sum()
                if attack:  # clean accuracy needs its own forward, in eval mode like the test
                    model.eval()
                    nat_correct = count_correct(model, x, y)
                    model.train()
                else:
                    nat_correct = adv_correct
                sums += torch.stack([loss.detach() * len(y), penalty.detach() * len(y),
                                     nat_correct.float(), adv_correct.float(), torch.tensor(float(len(y)), device=device)])
        loss_avg, pen_avg, tr_nat, tr_adv, n = (sums[:4] / sums[4]).tolist() + [sums[4].item()]

        residual = float("nan")
        if admm_state and (epoch + 1) % pcfg["update_every"] == 0:
            res = admm_state.update(weights, pcfg["rho_growth"])
            residual = max(res.values())
            LOG.info(f"   admm update after epoch {epoch + 1}: rho={next(iter(admm_state.rho.values())):.4g} "
                     "||W-Z||/||W||: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))
        te = {"natural": float("nan"), "pgd": float("nan")}
        if (epoch + 1) % cfg["eval"]["every"] == 0 or epoch + 1 == scfg["epochs"]:
            te, _ = evaluate(model, test, {"natural": None, "pgd": eval_attack}, cfg["data"]["test_batch_size"],
                             device, cfg["eval"]["limit"], desc="test")
        row = {"stage": stage, "epoch": epoch + 1, "lr": lr, "loss": loss_avg, "penalty": pen_avg,
               "train_natural": tr_nat, "train_adv": tr_adv if attack else float("nan"),
               "test_natural": te["natural"], "test_pgd": te["pgd"], "admm_residual": residual,
               "time": time.time() - t0}
        LOG.info(f"{stage:8} {epoch + 1:4d} {lr:8.5f} {loss_avg:7.4f} {pen_avg:8.4f} {tr_nat:6.3f} "
                 f"{row['train_adv']:6.3f} {te['natural']:6.3f} {te['pgd']:6.3f} {residual:6.4f} {row['time']:5.1f}s")
        if not math.isfinite(loss_avg):
            raise UserError(f"{stage} stage: loss became {loss_avg} in epoch {epoch + 1}; lower {stage}.lr "
                            f"(or prune.rho); {out}/{stage}.pt was not written")
    if hook:
        hook.remove()
    ckpt = make_checkpoint(stage, scfg["epochs"], model, optimizer, cfg, attack is not None,
                           admm_state, masks, row)
    save_checkpoint(ckpt, os.path.join(out, f"{stage}.pt"))
    LOG.info(f"saved {os.path.join(out, f'{stage}.pt')}")
    return ckpt


def make_checkpoint(stage, epoch, model, optimizer, cfg, adversarial, admm_state, masks, metrics):
    """A plain dict (tensors, numbers, strings) that loads with ``weights_only=True``."""
    return {"stage": stage, "epoch": epoch, "arch": cfg["model"]["arch"], "width": cfg["model"]["width"],
            "dataset": cfg["data"]["dataset"], "adversarial": adversarial, "config": cfg,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "admm": admm_state.state_dict() if admm_state else None,
            "masks": {n: m.cpu() for n, m in masks.items()} or None,
            "metrics": metrics, "git": git_hash()}


# --------------------------------------------------------------------------- reports

# --------------------------------------------------------------------------- command line

def parse_args(argv, adversarial):
    p = argparse.ArgumentParser(
        description=("Adversarial (PGD) training" if adversarial else "Natural training")
        + " with ADMM pruning: pretrain -> admm -> retrain.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--stage", default="all", choices=("all", *STAGES), help="stage to run (default: all three)")
    p.add_argument("--out", help="run folder (default: runs/<config stem>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable")
    p.add_argument("--init", help="checkpoint to start the (first) stage from, instead of the run folder's")
    return p.parse_args(argv)


def run(argv=None, adversarial=True):
    """Entry point of main.py / adv_main.py. User errors exit with one line and status 2."""
    try:
        _run(parse_args(argv, adversarial), adversarial)
    except UserError as e:
        LOG.error(f"error: {e}") if LOG.handlers else print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished stages are saved in the run folder", file=sys.stderr)
        sys.exit(130)


def _run(args, adversarial):
    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    stages = STAGES if args.stage == "all" else (args.stage,)
    device = get_device(cfg["device"])

    # Everything that can be checked is checked before any work: model names, input checkpoint.
    train, test, info = data_lib.load_data(cfg)
    model = model_from_config(cfg, info, device)
    try:
        ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    except ValueError as e:
        raise UserError(str(e)) from None
    last = list(admm_lib.prunable_weights(model))[-1]
    if cfg["prune"]["sparsity_type"] == "filter" and last in ratios:
        raise UserError(f"prune.prune_ratios.{last}: filter pruning the output layer would delete classes; "
                        f"set its ratio to 0 or use irregular/column pruning for it")
    prev = STAGES[STAGES.index(stages[0]) - 1] if stages[0] != "pretrain" else None
    start = args.init or (os.path.join(out, f"{prev}.pt") if prev else None)
    if args.init and not os.path.isfile(args.init):
        raise UserError(f"--init {args.init} does not exist")
    if start and not os.path.isfile(start):
        raise UserError(f"stage {stages[0]} starts from {start}, which does not exist; run --stage {prev} "
                        f"first (same --out) or pass --init CKPT")
    init = load_checkpoint(start, map_location=device) if start else None
    if init:
        load_weights(model, init, start, cfg)

    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    except OSError as e:
        raise UserError(f"cannot write to run folder {out}: {e.strerror}; choose another --out") from None
    setup_logging(os.path.join(out, "log.txt"))
    LOG.info(f"{'adv_main' if adversarial else 'main'}: config {args.config} -> {out} on {device}; "
             f"{cfg['model']['arch']} w={cfg['model']['width']}, {cfg['data']['dataset']} "
             f"({len(train.labels)} train / {len(test.labels)} test)"
             + (f", init {start}" if start else ""))
    attack = train_attack(cfg, adversarial)
    if attack:
        LOG.info(f"training attack: {attack!r}")

    for stage in stages:
        init = train_stage(stage, model, cfg, train, test, info, attack, device, out, init)

    if args.stage == "all":
        rep = report(model, cfg, test, device, standard_attacks(cfg))
        LOG.info("final model (" + os.path.join(out, "retrain.pt") + "):\n" + format_report(rep))
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(rep, f, indent=2)
