"""The shared pipeline behind ``main.py`` (natural training) and ``adv_main.py`` (PGD training).

Three stages, each one function call with the same signature (``train_stage``):

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2, updating Z and U every few epochs
    retrain   hard-prune W onto the sparsity set, then train with the masks held fixed

Each stage starts from the previous stage's checkpoint in the run folder (or ``--init``) and
writes ``<out>/<stage>.pt``. The two entry scripts differ only in the training attack.
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml

import admm as admm_lib
import data as data_lib
import distributed as dist
from attacks import PGD
from common import (LOG, UserError, get_device, git_hash, load_checkpoint, rng_state, save_checkpoint, seed_everything,
                    set_rng_state, setup_logging)
from config import load_config
from evaluation import count_correct, evaluate, format_report, load_weights, model_from_config, progress, report, standard_attacks

STAGES = ("pretrain", "admm", "retrain")


# --------------------------------------------------------------------------- building blocks

def train_attack(cfg, adversarial):
    """The attack that makes each training batch, from ``cfg['adv']``: PGD (Madry et al. 2018),
    or ``fgsm_rs`` (Wong et al. 2020: one step of 1.25 eps from a uniform random start, which is
    PGD with steps=1). None for natural training and for ``free``, whose perturbation is made
    inside the training step (``free_step``)."""
    a = cfg["adv"]
    if not adversarial or a["method"] == "free":
        return None
    if a["method"] == "fgsm_rs":
        return PGD(a["eps"], 1.25 * a["eps"], 1, 1, True)
    return PGD(a["eps"], a["step_size"], a["steps"], a["restarts"], a["random_start"])


def make_optimizer(params, scfg):
    if scfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=scfg["lr"], momentum=scfg["momentum"], weight_decay=scfg["weight_decay"])
    return torch.optim.Adam(params, lr=scfg["lr"], weight_decay=scfg["weight_decay"])


def lr_at(scfg, epoch, epochs):
    """Learning rate for ``epoch`` (0-based) of ``epochs``. Derived from the epoch, so resuming
    needs no scheduler state."""
    if scfg["schedule"] == "cosine":
        return scfg["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if scfg["schedule"] == "step":
        return scfg["lr"] * scfg["gamma"] ** sum(epoch >= m for m in scfg["milestones"])
    return scfg["lr"]


class Precision:
    """Mixed precision from ``perf.amp`` (off | bf16 | fp16); a no-op unless the device is CUDA.

    Training runs under autocast in the chosen dtype, with a gradient scaler for fp16. The attack
    never runs in fp16: its input gradient can underflow to 0, and sign(0) = 0 silently weakens
    the attack. It uses bf16 (fp32's exponent range) where the GPU supports it, else fp32.
    """

    def __init__(self, mode, device):
        self.on = device.type == "cuda" and mode != "off"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler("cuda") if self.on and mode == "fp16" else None
        self.attack_bf16 = self.on and torch.cuda.is_bf16_supported()

    def train(self):
        return torch.autocast("cuda", self.dtype) if self.on else contextlib.nullcontext()

    def attack(self):
        return torch.autocast("cuda", torch.bfloat16) if self.attack_bf16 else contextlib.nullcontext()

    def step(self, loss, optimizer):
        """backward + optimizer step (through the scaler for fp16)."""
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


FP32 = Precision("off", torch.device("cpu"))


def train_step(net, model, x, y, optimizer, attack=None, penalty=None, precision=FP32):
    """One step of min-max training (Madry et al. 2018, Eq. 2.1; ICCV'19 Eq. 4 with the ADMM term):
    x_adv = attack(model, x, y), then one optimizer step on CE(net(x_adv), y) + penalty().

    ``net`` is the model as trained (possibly DDP-wrapped or compiled), ``model`` the plain module
    the attack runs on. Returns (loss, penalty, logits on x_adv), detached, on the device.
    """
    if attack is not None:
        with precision.attack():
            x = attack(model, x, y)
    with precision.train():
        logits = net(x)
        loss = F.cross_entropy(logits, y)
    pen = penalty() if penalty else torch.zeros((), device=x.device)
    optimizer.zero_grad(set_to_none=True)
    precision.step(loss + pen, optimizer)
    return loss.detach(), pen.detach(), logits.detach()


def free_step(net, x, y, optimizer, delta, eps, replays, penalty=None, precision=FP32):
    """Adversarial training for free (Shafahi et al. 2019, Alg. 1): ``replays`` optimizer steps on
    the same minibatch; each backward gives both the weights' gradient and the input gradient,
    used for an FGSM step of size eps on the perturbation ``delta`` ([B, C, H, W], updated in
    place and carried over to the next minibatch). Returns the last replay's (loss, penalty, logits)."""
    d = delta[: len(x)]
    for _ in range(replays):
        d = d.detach().requires_grad_(True)
        with precision.train():
            logits = net((x + d).clamp(0, 1))
            loss = F.cross_entropy(logits, y)
        pen = penalty() if penalty else torch.zeros((), device=x.device)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss + pen, optimizer)
        # A scaled (fp16) gradient has the same sign; one the scaler found non-finite (its step was
        # skipped) must not turn delta into NaN for good.
        d = (d + eps * torch.nan_to_num(d.grad, nan=0.0, posinf=0.0, neginf=0.0).sign()).clamp(-eps, eps)
    delta[: len(x)] = d.detach()
    return loss.detach(), pen.detach(), logits.detach()


# --------------------------------------------------------------------------- one stage

class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the run's state is saved; carries the exit message."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class GracefulStop:
    """While active, SIGINT/SIGTERM only set ``signum``; the training loop then saves a last
    checkpoint at the next step (every ``STOP_CHECK_EVERY`` steps under torchrun, where the ranks
    agree on it) and stops. A second signal stops at once (the last saved state stays valid:
    saves are atomic)."""

    def __init__(self, device):
        self.signum, self.device = None, device  # the all-reduce runs on the device (NCCL needs CUDA tensors)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        LOG.warning(f"got {signal.Signals(signum).name}: saving at the next step (send again to stop now)")

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def requested(self, step=None):
        """Whether to stop after ``step`` (0-based; None: at an epoch's end). Under torchrun the
        ranks agree on it through an all-reduce every STOP_CHECK_EVERY steps."""
        if not dist.launched():
            return self.signum is not None
        if step is not None and (step + 1) % STOP_CHECK_EVERY:
            return False
        return dist.all_sum(torch.tensor([float(self.signum or 0)], device=self.device)).item() > 0


STOP_CHECK_EVERY = 20
# Natural training accuracy of adversarial training needs an extra clean forward: 4% of a PGD-10
# LeNet step, 12% of a PGD-3 VGG step (bench/train_step.py); measured on every 10th step only.
NATURAL_EVERY = 10


@dataclass
class RunContext:
    """What every stage needs besides the model: settings, data, the training method, where to save.
    (The model, optimizer, masks and ADMM state are created and owned by ``train_stage``.)"""
    cfg: dict
    train: data_lib.Split
    test: data_lib.Split
    info: data_lib.DatasetInfo
    method: str     # natural | pgd | fgsm_rs | free
    attack: object  # the training attack (pgd, fgsm_rs), else None
    device: torch.device
    out: str
    stop: GracefulStop
    resume_command: str


def train_stage(stage, model, run, init=None, resume=None):
    """Run one stage on ``model`` and save ``<out>/<stage>.pt``; return that checkpoint.

    ``init`` is the checkpoint the stage starts from (its weights are already in ``model``; its
    masks are kept, so a pruned weight never comes back), None when pretraining from scratch.
    ``resume`` is this stage's ``<stage>.last.pt``: model, optimizer, masks, ADMM state, epoch,
    step and RNG states are restored from it and training continues exactly where it stopped.
    ``<out>/<stage>.last.pt`` is rewritten after every epoch (and every ``checkpoint.every_steps``
    steps) and removed once the stage's final checkpoint is written. Under torchrun every rank
    runs this; only rank 0 logs and saves.
    """
    cfg, scfg, pcfg, device = run.cfg, run.cfg[stage], run.cfg["prune"], run.device
    weights = admm_lib.prunable_weights(model)
    ratios = admm_lib.resolve_ratios(model, pcfg["prune_ratios"])
    scheme = pcfg["sparsity_type"]
    optimizer = make_optimizer(model.parameters(), scfg)
    precision = Precision(cfg["perf"]["amp"], device)
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if precision.scaler and resume.get("scaler"):
            precision.scaler.load_state_dict(resume["scaler"])
        masks = {n: m.to(device) for n, m in (resume["masks"] or {}).items()}
        admm_state = admm_lib.ADMM.from_state_dict(resume["admm"], device) if resume["admm"] else None
        start_epoch, start_step, metrics = resume["epoch"], resume["step"], resume["metrics"]
        # The saved sums are over all ranks; rank 0 carries them on.
        partial_sums = resume["sums"].to(device) * (1.0 if dist.is_main() else 0.0)
        set_rng_state(resume["rng"])
        if resume.get("world", 1) != dist.world():
            LOG.warning(f"resuming on {dist.world()} processes, saved on {resume.get('world', 1)}: "
                        "the rest of this epoch sees the data in another order")
        LOG.info(f"== resuming {stage} at epoch {start_epoch + 1}, step {start_step}")
    else:
        # Ranks draw different attack random starts (the weights are kept equal by DDP).
        seed_everything(cfg["seed"] + STAGES.index(stage) + 1000 * dist.rank())
        masks = {n: m.to(device) for n, m in ((init or {}).get("masks") or {}).items()}
        admm_state = None
        if stage == "admm":
            if pcfg["masked_progressive"]:  # already-zero weights stay zero (progressive pruning)
                masks.update(admm_lib.nonzero_masks(weights, weights))
            admm_state = admm_lib.ADMM(weights, ratios, scheme, pcfg["rho"])
        elif stage == "retrain":
            # Hard pruning: W = Pi_S(W); the kept set is then frozen by the masks.
            pruned = admm_lib.hard_prune(weights, ratios, scheme)
            masks = {n: pruned[n] & masks[n] if n in masks else pruned[n] for n in {*masks, *pruned}}
        start_epoch, start_step, metrics, partial_sums = 0, 0, {}, None
    hook = admm_lib.attach_masks(optimizer, weights, masks) if masks else None
    penalty = (lambda: admm_state.penalty(weights)) if admm_state else None
    net, attack_model = wrap_for_training(model, cfg, device)
    last_path = os.path.join(run.out, f"{stage}.last.pt")

    def save(path, epoch, step, sums):
        """The checkpoint dict (built on every rank: the next stage starts from it); rank 0 writes it."""
        ckpt = {"stage": stage, "epoch": epoch, "step": step, "arch": cfg["model"]["arch"],
                "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
                "adversarial": run.method != "natural", "method": run.method, "config": cfg,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler else None,
                "admm": admm_state.state_dict() if admm_state else None,
                "masks": {n: m.cpu() for n, m in masks.items()} or None,
                "metrics": metrics, "rng": rng_state(), "sums": sums.cpu(), "world": dist.world(), "git": git_hash(),
                "free_delta": delta.cpu() if delta is not None else None}
        if dist.is_main():
            save_checkpoint(ckpt, path)
        return ckpt

    def check_finite(bad_step, epoch):
        # One host sync, only where state is about to be saved or the epoch ends.
        if dist.all_sum((bad_step >= 0).float()).item() > 0:
            where = f"step {bad_step.item() + 1}" if bad_step.item() >= 0 else "a step on another rank"
            raise UserError(f"{stage} stage: loss is not finite (nan/inf) at epoch {epoch + 1}, {where}; stopped "
                            f"without saving this state. The last good checkpoint is intact: lower {stage}.lr "
                            f"(or prune.rho) and continue with: {run.resume_command}")

    def stop(epoch, step):
        name = signal.Signals(run.stop.signum).name if run.stop.signum else "a signal on another rank"
        raise Interrupted(f"stopped by {name} in {stage} epoch {epoch + 1} after step {step}; saved {last_path}. "
                          f"Resume with: {run.resume_command}", run.stop.signum or signal.SIGTERM)

    replays = cfg["adv"]["free_replays"] if run.method == "free" else 1
    epochs = math.ceil(scfg["epochs"] / replays)  # free: each minibatch is replayed m times
    delta = None
    if run.method == "free":  # the perturbation carried from minibatch to minibatch (and saved with the state)
        i = run.info
        delta = torch.zeros(cfg["data"]["batch_size"], i.in_channels, i.image_size, i.image_size, device=device)
        if resume and resume.get("free_delta") is not None:
            delta.copy_(resume["free_delta"])
    LOG.info(f"== {stage}: {epochs} epochs, {run.method} training"
             + (f" ({replays} replays per minibatch)" if run.method == "free" else "")
             + (f", {scheme} pruning of {len(ratios)} layers" if stage != "pretrain" else "")
             + (f", {dist.world()} processes" if dist.launched() else ""))
    LOG.info(f"{'stage':8} {'ep':>4} {'lr':>8} {'loss':>7} {'penalty':>8} {'tr_nat':>6} {'tr_adv':>6} "
             f"{'te_nat':>6} {'te_pgd':>6} {'resid':>6} {'time':>6}")
    eval_attack = standard_attacks(cfg, ["pgd"])["pgd"]
    batch_size, every = cfg["data"]["batch_size"], cfg["checkpoint"]["every_steps"]
    channels_last = cfg["perf"]["channels_last"] and device.type == "cuda"
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        lr = lr_at(scfg, epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        # Running sums stay on the device (loss, penalty, natural correct, adversarial correct); the
        # example counts (n, n seen by the natural-accuracy forward) are known on the host.
        totals = partial_sums if epoch == start_epoch and partial_sums is not None else torch.zeros(6, device=device)
        sums, counts = totals[:4].clone(), [int(c) for c in totals[4:].tolist()]

        def epoch_totals():  # the six running totals, summed over ranks
            return dist.all_sum(torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=device)]))

        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        skip = start_step if epoch == start_epoch else 0
        batches = data_lib.batches(run.train, batch_size, device, shuffle=True, augment=run.info.augment,
                                   seed=cfg["seed"], epoch=epoch, rank=dist.rank(), world=dist.world())
        total = data_lib.num_batches(run.train, batch_size, world=dist.world())
        for step, (x, y) in enumerate(progress(batches, total, f"{stage} {epoch + 1}") if dist.is_main() else batches):
            if step < skip:  # already trained before the resume; replayed to keep order and augmentation
                continue
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if run.method == "free":
                loss, pen, logits = free_step(net, x, y, optimizer, delta, cfg["adv"]["eps"], replays, penalty,
                                              precision)
            else:
                loss, pen, logits = train_step(net, attack_model, x, y, optimizer, run.attack, penalty, precision)
            with torch.no_grad():
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss + pen), step, bad_step)
                adv_correct = (logits.argmax(1) == y).sum()
                counts[0] += len(y)
                if run.method == "natural":
                    nat_correct = adv_correct
                elif step % NATURAL_EVERY == 0:  # a clean forward (eval mode, like the test) on a sample of steps
                    model.eval()
                    nat_correct = count_correct(attack_model, x, y)
                    model.train()
                else:
                    nat_correct = torch.zeros((), device=device)
                counts[1] += len(y) if run.method == "natural" or step % NATURAL_EVERY == 0 else 0
                sums += torch.stack([loss * len(y), pen * len(y), nat_correct.float(), adv_correct.float()])
            stopping = run.stop.requested(step)
            if stopping or (every and (step + 1) % every == 0):
                check_finite(bad_step, epoch)
                save(last_path, epoch, step + 1, epoch_totals())
                if stopping:
                    stop(epoch, step + 1)
        check_finite(bad_step, epoch)
        totals = epoch_totals()
        loss_avg, pen_avg, tr_nat, tr_adv = (totals[:4] / totals[[4, 4, 5, 4]].clamp_min(1)).tolist()

        residual = float("nan")
        if admm_state and (epoch + 1) % pcfg["update_every"] == 0:
            res = admm_state.update(weights, pcfg["rho_growth"])
            residual = max(res.values())
            LOG.info(f"   admm update after epoch {epoch + 1}: rho={next(iter(admm_state.rho.values())):.4g} "
                     "||W-Z||/||W||: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))
            if dist.launched():  # Z, U, rho and masks are computed, not communicated: check they agree
                if not dist.same_on_all_ranks(_fingerprint(admm_state, masks)):
                    raise RuntimeError("ADMM state differs between ranks; this is a bug, please report it")
                LOG.info(f"   ADMM state identical on {dist.world()} ranks")
        te = {"natural": float("nan"), "pgd": float("nan")}
        if (epoch + 1) % cfg["eval"]["every"] == 0 or epoch + 1 == epochs:
            te, _ = evaluate(model, run.test, {"natural": None, "pgd": eval_attack}, cfg["data"]["test_batch_size"],
                             device, cfg["eval"]["limit"], desc="test")
        best = max(metrics.get("best_test_pgd", float("-inf")), te["pgd"] if math.isfinite(te["pgd"]) else float("-inf"))
        # best_test_pgd is informational only: the saved model is always the last epoch's.
        metrics = {"stage": stage, "epoch": epoch + 1, "lr": lr, "loss": loss_avg, "penalty": pen_avg,
                   "train_natural": tr_nat, "train_adv": tr_adv if run.method != "natural" else float("nan"),
                   "test_natural": te["natural"], "test_pgd": te["pgd"], "best_test_pgd": best,
                   "admm_residual": residual, "time": time.time() - t0}
        LOG.info(f"{stage:8} {epoch + 1:4d} {lr:8.5f} {loss_avg:7.4f} {pen_avg:8.4f} {tr_nat:6.3f} "
                 f"{metrics['train_adv']:6.3f} {te['natural']:6.3f} {te['pgd']:6.3f} {residual:6.4f} "
                 f"{metrics['time']:5.1f}s")
        save(last_path, epoch + 1, 0, torch.zeros(6))
        if run.stop.requested():
            stop(epoch + 1, 0)
    if hook:
        hook.remove()
    ckpt = save(os.path.join(run.out, f"{stage}.pt"), epochs, 0, torch.zeros(6))
    if dist.is_main() and os.path.exists(last_path):
        os.remove(last_path)
    LOG.info(f"saved {os.path.join(run.out, f'{stage}.pt')}")
    return ckpt


def _fingerprint(admm_state, masks):
    """Per-layer sums of Z, |Z|, U, rho and mask sizes: equal on all ranks iff (almost surely) the
    states are."""
    rows = [torch.stack([admm_state.Z[n].sum(), admm_state.Z[n].abs().sum(), admm_state.U[n].sum(),
                         torch.tensor(admm_state.rho[n], device=admm_state.Z[n].device)]) for n in admm_state.Z]
    rows += [m.sum().float().view(1) for m in masks.values()]
    return torch.cat([r.flatten().float() for r in rows])


def wrap_for_training(model, cfg, device):
    """(net, attack_model): the module the training forward runs through (DDP under torchrun,
    compiled with ``perf.compile``) and the one attacks and clean forwards use (never DDP: an
    attack needs no gradient all-reduce). ``perf.channels_last`` and ``perf.compile`` apply on
    CUDA only."""
    if device.type == "cuda" and cfg["perf"]["channels_last"]:
        model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.launched() else model
    attack_model = model
    if device.type == "cuda" and cfg["perf"]["compile"]:
        net, attack_model = torch.compile(net), torch.compile(model)
    return net, attack_model


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
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (finished stages are skipped)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing checkpoints already in --out")
    return p.parse_args(argv)


def run(argv=None, adversarial=True):
    """Entry point of main.py / adv_main.py. User errors exit with one line and status 2;
    SIGINT/SIGTERM save the state and exit with 128 + signal number."""
    try:
        _run(parse_args(argv, adversarial), adversarial)
    except UserError as e:
        if dist.is_main():  # under torchrun every rank hits the same error; say it once
            LOG.error(f"error: {e}") if LOG.handlers else print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        LOG.warning(str(e))
        sys.exit(128 + e.signum)
    except OSError as e:  # e.g. a full disk during a save: the previous checkpoint is intact
        if dist.is_main():
            print(f"error: {e.filename or ''}: {e.strerror}; the last saved checkpoints are intact "
                  "(continue with --resume)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stopped; the last saved checkpoints in the run folder are intact (continue with --resume)",
              file=sys.stderr)
        sys.exit(130)
    finally:
        dist.close()


def _resume_command(args, out, adversarial):
    cmd = ["python", "adv_main.py" if adversarial else "main.py", "--config", args.config, "--out", out]
    cmd += (["--stage", args.stage] if args.stage != "all" else [])
    cmd += [a for o in args.overrides for a in ("--set", o)] + ["--resume"]
    return " ".join(shlex.quote(c) for c in cmd)


def _run(args, adversarial):
    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    stages = STAGES if args.stage == "all" else (args.stage,)
    device = dist.init(get_device(cfg["device"]))
    if args.resume and args.init:
        raise UserError("--resume continues from the run folder's own checkpoints; drop --init")

    # Everything that can be checked is checked before any work: names, files, folder.
    train, test, info = data_lib.load_data(cfg)
    seed_everything(cfg["seed"])  # the initial weights depend on the seed only
    model = model_from_config(cfg, info, device)
    try:
        ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if not ratios and set(stages) & {"admm", "retrain"}:
        raise UserError("prune.prune_ratios prunes no layer (empty, or all ratios 0); give ratios, "
                        "or run only --stage pretrain")
    last = list(admm_lib.prunable_weights(model))[-1]
    if cfg["prune"]["sparsity_type"] == "filter" and last in ratios:
        raise UserError(f"prune.prune_ratios.{last}: filter pruning the output layer would delete classes; "
                        f"set its ratio to 0 or use irregular/column pruning for it")

    path = lambda name: os.path.join(out, name)  # noqa: E731
    existing = [f for s in stages for f in (f"{s}.pt", f"{s}.last.pt") if os.path.isfile(path(f))]
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{out} already holds {', '.join(existing)}; continue that run with --resume, "
                        f"replace it with --overwrite, or choose another --out")
    todo = list(stages)
    if args.resume:
        if not existing:
            raise UserError(f"nothing to resume in {out}: no checkpoint of stage(s) {', '.join(stages)}; "
                            f"run without --resume")
        while todo and os.path.isfile(path(f"{todo[0]}.pt")):
            done = todo.pop(0)
            if load_checkpoint(path(f"{done}.pt")).get("adversarial") != adversarial:
                raise UserError(f"{path(done + '.pt')} was written by {'main.py' if adversarial else 'adv_main.py'}; "
                                "resume the run with that script")
    resume = load_checkpoint(path(f"{todo[0]}.last.pt"), device) \
        if todo and args.resume and os.path.isfile(path(f"{todo[0]}.last.pt")) else None
    init = None
    if resume:
        if resume.get("adversarial") != adversarial:
            raise UserError(f"{path(todo[0] + '.last.pt')} was written by "
                            f"{'adv_main.py' if resume.get('adversarial') else 'main.py'}; resume it with that script")
        load_weights(model, resume, path(f"{todo[0]}.last.pt"), cfg)  # checks arch and width
    elif todo:
        prev = STAGES[STAGES.index(todo[0]) - 1] if todo[0] != "pretrain" else None
        start = args.init or (path(f"{prev}.pt") if prev else None)
        if args.init and not os.path.isfile(args.init):
            raise UserError(f"--init {args.init} does not exist")
        if start and not os.path.isfile(start):
            raise UserError(f"stage {todo[0]} starts from {start}, which does not exist; run --stage {prev} "
                            f"first (same --out) or pass --init CKPT")
        init = load_checkpoint(start, map_location=device) if start else None
        if init:
            load_weights(model, init, start, cfg)
    elif args.stage == "all":  # everything done already: report on the final model
        load_weights(model, load_checkpoint(path("retrain.pt"), device), path("retrain.pt"), cfg)

    changed = []
    try:
        os.makedirs(out, exist_ok=True)
        if not dist.is_main():
            raise _NotMain
        for f in os.listdir(out):  # temp files of a save that was killed
            if f.startswith(".tmp-"):
                os.remove(path(f))
        if args.resume and os.path.isfile(path("config.yaml")):
            with open(path("config.yaml")) as f:
                old = yaml.safe_load(f)
            changed = [k for k in sorted(set(_flat(old)) | set(_flat(cfg))) if _flat(old).get(k) != _flat(cfg).get(k)]
        with open(path("config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    except _NotMain:
        pass
    except OSError as e:
        raise UserError(f"cannot write to run folder {out}: {e.strerror}; choose another --out") from None
    setup_logging(path("log.txt") if dist.is_main() else None, enabled=dist.is_main())
    LOG.info(f"{'adv_main' if adversarial else 'main'}: config {args.config} -> {out} on {device}; "
             f"{cfg['model']['arch']} w={cfg['model']['width']}, {cfg['data']['dataset']} "
             f"({len(train.labels)} train / {len(test.labels)} test)"
             + (f"; {dist.world()} processes x batch {cfg['data']['batch_size']}" if dist.launched() else ""))
    if args.resume and changed:
        LOG.warning(f"resuming with a config that differs from the run's in: {', '.join(changed)}")
    if not todo:
        LOG.info(f"all of {', '.join(stages)} already complete in {out}")
    method = cfg["adv"]["method"] if adversarial else "natural"
    attack = train_attack(cfg, adversarial)
    if attack:
        LOG.info(f"training attack ({method}): {attack!r}")

    with GracefulStop(device) as stop:
        ctx = RunContext(cfg, train, test, info, method, attack, device, out, stop,
                         _resume_command(args, out, adversarial))
        for stage in todo:
            init = train_stage(stage, model, ctx, init, resume if stage == todo[0] else None)

    if args.stage == "all" and dist.is_main():
        rep = report(model, cfg, test, device, standard_attacks(cfg))
        LOG.info("final model (" + path("retrain.pt") + "):\n" + format_report(rep))
        with open(path("eval.json"), "w") as f:
            json.dump(rep, f, indent=2)
    # The other ranks wait for rank 0's final report: a rank that tears the process group down
    # while a peer still uses it can abort (seen with gloo).
    dist.barrier()


class _NotMain(Exception):
    """Only rank 0 writes to the run folder."""


def _flat(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and k != "prune_ratios":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
