"""The loop that runs one stage (``train_stage``): epochs of minibatches through the training
method's step, the stage's periodic updates, a test evaluation, a row per epoch in the log and in
metrics.jsonl, and a checkpoint after every epoch (and every ``checkpoint.every_steps`` steps).
With a validation split (``data.val_size``) it is evaluated too, and a stage with ``patience``
(pretraining) stops on it and keeps its best epoch (``training.state.EarlyStop``).
What differs between stages is a ``pruning.stages.Stage`` object, and what differs between
training methods is a ``training.methods`` object; the loop never asks which one it runs."""
import itertools
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

import admm as admm_lib
import data as data_lib
from training import distributed as dist
from common import LOG, UserError, load_checkpoint, progress, seed_everything
from evaluation.accuracy import count_correct, evaluate, standard_attacks
from training.methods import Method
from training.rundir import RunFolder
from pruning.plan import make_stage, stage_names
from training.stops import SELF_SIGNAL, AttackStopped, GracefulStop, Interrupted, set_torch_rng, torch_rng
from training.state import Schedule, TrainState, lr_at, wrap_for_training


# Natural training accuracy of adversarial training needs an extra clean forward, a few percent of
# a step (bench/train_step.py measures it); it is measured on every 10th step only.
NATURAL_EVERY = 10


@dataclass
class RunContext:
    """What every stage needs besides the model: settings, data, the training method, the folder."""
    cfg: dict
    train: data_lib.Split
    test: data_lib.Split
    info: data_lib.DatasetInfo
    method: Method  # Natural, AttackTraining (pgd, fgsm_rs) or Free
    device: torch.device
    folder: RunFolder
    stop: GracefulStop
    resume_command: str  # the command that continues the run (--resume) ...
    rerun_command: str = ""  # ... and the one that starts it again, while the folder holds no checkpoint of
    stages: tuple = ()       # the stages this command runs
    val: data_lib.Split = None  # the validation split (data.val_size), or None / empty

    def continue_with(self):
        """The command to go on with after a stop: ``--resume`` only if there is something to resume."""
        return self.resume_command if self.folder.existing(self.stages) else self.rerun_command


# --------------------------------------------------------------------------- the loop

def train_stage(name, model, run, init=None, resume=None):
    """Run stage ``name`` (one of ``pruning.plan.pipeline``'s) on ``model`` and save ``<out>/<name>.pt``;
    return that checkpoint.

    ``init`` is the checkpoint the stage starts from (its weights are already in ``model``; its
    masks are kept), None when pretraining from scratch. ``resume`` is this stage's
    ``<name>.last.pt``, from which training continues exactly where it stopped. The running state
    is saved to ``<name>.last.pt`` after every epoch (and every ``checkpoint.every_steps`` steps).
    Under torchrun every rank runs this; only rank 0 logs and saves.
    """
    cfg = run.cfg
    state = start_state(name, model, run, init, resume)
    stage, scfg = state.stage, cfg[state.stage.section]
    hook = admm_lib.attach_masks(state.optimizer, stage.weights, state.masks) if state.masks else None
    view = stage.network(model)  # what trains, is attacked and evaluated: the model, or a masked view of it
    nets = wrap_for_training(view, cfg, run.device)
    sched = Schedule(scfg["epochs"], data_lib.num_batches(run.train, cfg["data"]["batch_size"], world=dist.world()),
                     run.method.replays)
    LOG.info(f"== {name}: {scfg['epochs']} epochs, {run.method!r}{stage!r}"
             + (f", {dist.world()} processes" if dist.launched() else ""))
    loss_label = "loss" if run.method.loss.name == "ce" else run.method.loss.name  # names a TRADES / MART loss
    LOG.info(f"{'stage':8} {'ep':>4} {'lr':>8} {loss_label:>7} {'penalty':>8} {'tr_nat':>6} {'tr_adv':>6} "
             f"{'te_nat':>6} {'te_pgd':>6} {'gap':>6} {'time':>6}")
    eval_attacks = {"natural": None, "pgd": standard_attacks(cfg, ["pgd"])["pgd"]}
    for epoch in range(state.epoch, sched.loops):
        if state.early and state.early.stopped:  # stopped early before a resume
            break
        t0 = time.time()
        train = run_epoch(state, nets, sched, run)
        test = {"natural": math.nan, "pgd": math.nan}
        due = sched.loop_reaches(cfg["eval"]["every"], epoch) or epoch + 1 == sched.loops
        if due:
            test, _ = evaluate(view, run.test, eval_attacks, cfg["data"]["test_batch_size"], run.device,
                               cfg["eval"]["limit"], desc="test")
        val = validate(view, run, eval_attacks) if due or state.early else {}
        stopping = bool(state.early) and state.early.observe(epoch + 1, val["val_pgd"], model)  # the val split only
        state.metrics = {**epoch_metrics(state, sched, epoch, train, test, time.time() - t0), **val}
        log_epoch(state.metrics, run.folder)
        state.epoch, state.step = epoch + 1, 0
        state.meter.reset()
        save(state, run.folder, run.folder.last(name))
        if run.stop.requested():
            stop(state, run)
        if stopping:
            break
    if hook:
        hook.remove()
    if state.early:  # the best epoch's weights are the stage's model
        keep_best(state, name, model)
    stage.finish(state.masks)  # quantize: hard quantization; hydra, harp: the learned masks applied
    state.metrics["convergence"] = state.convergence()  # with the figures of finish
    ckpt = save(state, run.folder, run.folder.final(name))
    if dist.is_main() and os.path.exists(run.folder.last(name)):
        os.remove(run.folder.last(name))
    LOG.info(f"saved {run.folder.final(name)}")
    return ckpt


def start_state(name, model, run, init, resume):
    """The ``TrainState`` of stage ``name``: its stage object built for ``model`` (with the run's
    allocation), continued from ``resume`` (its rows after that checkpoint dropped from
    metrics.jsonl), or started from ``init`` (seeded per stage and rank; the rows of an earlier
    attempt at this stage and the ones after it dropped)."""
    cfg = run.cfg
    source = run.folder.last(name) if resume else f"the {init.get('stage')} checkpoint" if init else None
    index, stage = make_stage(name, model, cfg, resume or init, source, lambda path: load_checkpoint(path, run.device))
    state = TrainState(stage, model, run.method, cfg, run.device)
    if resume:
        state.load_state_dict(resume)
        if dist.is_main():
            run.folder.truncate_metrics(state.log_bytes)
        LOG.info(f"== resuming {name} at epoch {state.epoch + 1}, step {state.step}")
    else:
        seed_everything(cfg["seed"] + index + 1000 * dist.rank())  # ranks: their own attack starts
        state.begin(init)
        if dist.is_main():
            run.folder.drop_metrics(stage_names(cfg)[index:])
    return state


def keep_best(state, name, model):
    """Early stopping's end: the best epoch's weights become the stage's model, and its summary
    goes into the metrics."""
    state.early.restore(model)
    state.early.weights = None  # the final checkpoint's model holds them
    state.metrics["early_stop"] = state.early.summary()
    LOG.info(f"   {name}: best validation PGD accuracy {state.early.best:.4f} at epoch {state.early.best_epoch} "
             f"of {state.epoch} ({'stopped early' if state.early.stopped else 'max epochs'}); its weights kept")


def run_epoch(state, nets, sched, run):
    """Train one loop over the data (``sched.steps_in`` minibatches, from ``state.step`` on after a
    resume), with the stage's updates where they fall due. Returns the epoch's named averages
    (loss, penalty, train_natural, train_adv) and the largest residual of its last update."""
    cfg, epoch, model, stage = run.cfg, state.epoch, state.model, state.stage
    net, attack_model = nets
    n_steps = sched.steps_in(epoch)
    channels_last = cfg["perf"]["channels_last"] and run.device.type == "cuda"
    every = cfg["checkpoint"]["every_steps"]
    attack_model.train()  # the model, or the stage's view of it (which sets the model's mode)
    batches = data_lib.batches(run.train, cfg["data"]["batch_size"], run.device, shuffle=True, augment=run.info.augment,
                               seed=cfg["seed"], epoch=epoch, rank=dist.rank(), world=dist.world())
    batches = itertools.islice(batches, n_steps)  # free's last loop may be partial
    stoppable = state.method.attack is not None and not dist.launched()  # see GracefulStop.guard
    rng = torch_rng() if stoppable else None
    for step, (x, y) in enumerate(progress(batches, n_steps, f"{stage.name} {epoch + 1}") if dist.is_main() else batches):
        if step < state.step:  # trained before the resume; replayed to keep order and augmentation
            continue
        passes = sched.passes(epoch, step)
        lr = lr_at(cfg[stage.section], *stage.lr_clock(int(passes), sched.epochs))
        for group in state.optimizer.param_groups:  # a stage may give a group its own peak (score stages)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        state.method.progress(stage.kind, passes)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            loss, pen, logits = state.method.step(net, attack_model, x, y, state.optimizer, stage.penalty,
                                                  state.precision)
        except AttackStopped:  # the step's attack was cut short: undo its draws and save the state before it
            set_torch_rng(rng)
            check_finite(state, run)
            save(state, run.folder, run.folder.last(stage.name))
            stop(state, run)
        correct = (logits.argmax(1) == y).sum()
        natural = correct if state.method.clean_logits else sampled_natural_correct(model, attack_model, x, y, step)
        state.meter.add(step, loss, pen, correct, len(y), natural)
        state.step = step + 1
        if sched.reaches(stage.update_every, epoch, step + 1):
            check_finite(state, run)  # a non-finite W must not reach Z, U or the logs
            done = sched.passes(epoch, step + 1)
            update = stage.update(done, state.masks)
            LOG.info(f"   {stage.name} update after epoch {_fmt_passes(done)}: {stage.describe_update(update)}")
            log_update(run.folder, {"stage": stage.name, "passes": float(done),
                                    "lr": lr, **update})
        SELF_SIGNAL.after(stage.name, epoch * sched.batches + step + 1)  # tests only: stop at a known step
        stopping = run.stop.requested(step)
        if stopping or (every and (step + 1) % every == 0):
            check_finite(state, run)
            save(state, run.folder, run.folder.last(stage.name))
            if stopping:
                stop(state, run)
        if stoppable:
            rng = torch_rng()
    check_finite(state, run)
    train = state.meter.averages()
    if state.method.clean_logits:  # natural training: no adversarial examples were seen
        train["train_adv"] = math.nan
    return train


def epoch_metrics(state, sched, epoch, train, test, seconds):
    """The named figures of loop ``epoch`` for the log row, metrics.jsonl and the checkpoint.
    ``lr`` is the one the loop started with; ``passes``, the passes over the data made so far."""
    stage = state.stage
    best = max(state.metrics.get("best_test_pgd", -math.inf), test["pgd"] if math.isfinite(test["pgd"]) else -math.inf)
    # best_test_pgd is informational only: the saved model is always the last epoch's.
    return {"stage": stage.name, "epoch": epoch + 1, "passes": float(sched.passes(epoch, sched.steps_in(epoch))),
            "lr": lr_at(state.cfg[stage.section], *stage.lr_clock(int(sched.passes(epoch, 0)), sched.epochs)),
            "loss_fn": state.method.loss.name, "beta": state.method.loss.beta, **train,
            "test_natural": test["natural"], "test_pgd": test["pgd"], "best_test_pgd": best,
            "stage_gap": stage.largest_gap() if sched.loop_reaches(stage.update_every, epoch) else math.nan,
            "time": seconds, "convergence": state.convergence()}


def validate(view, run, attacks):
    """{val_natural, val_pgd} of ``view`` on the whole validation split (the ``eval`` section's
    PGD), logged; {} when there is none (``data.val_size`` 0)."""
    if run.val is None or not len(run.val.labels):
        return {}
    acc, n = evaluate(view, run.val, attacks, run.cfg["data"]["test_batch_size"], run.device, 0, desc="val")
    LOG.info(f"   validation ({n} held-out training images): natural {acc['natural']:.4f}, pgd {acc['pgd']:.4f}")
    return {"val_natural": acc["natural"], "val_pgd": acc["pgd"]}


def sampled_natural_correct(model, attack_model, x, y, step):
    """Clean correct count of an adversarial step, measured (eval mode, like the test) on every
    ``NATURAL_EVERY``-th step only; None on the others."""
    if step % NATURAL_EVERY:
        return None
    model.eval()
    correct = count_correct(attack_model, x, y)
    model.train()
    return correct


# --------------------------------------------------------------------------- saving, logging, stopping

def save(state, folder, path):
    """The checkpoint dict (built on every rank: the next stage starts from it); rank 0 writes it,
    recording how much of ``folder``'s metrics.jsonl belongs to it."""
    state.log_bytes = folder.metrics_bytes() if dist.is_main() else None
    ckpt = state.state_dict()
    if dist.is_main():
        folder.save(ckpt, path)
    return ckpt


def log_epoch(m, folder):
    """The epoch's row in the log, and in metrics.jsonl (rank 0)."""
    LOG.info(f"{m['stage']:8} {_fmt_passes(m['passes']):>4} {m['lr']:8.5f} {m['loss']:7.4f} {m['penalty']:8.4f} "
             f"{m['train_natural']:6.3f} {m['train_adv']:6.3f} {m['test_natural']:6.3f} {m['test_pgd']:6.3f} "
             f"{m['stage_gap']:6.4f} {m['time']:5.1f}s")
    if dist.is_main():
        folder.append_metrics({"kind": "epoch", **m})


def log_update(folder, row):
    """A stage update's figures in metrics.jsonl (rank 0)."""
    if dist.is_main():
        folder.append_metrics({"kind": "update", **row})


def _fmt_passes(passes):
    """Passes over the data as written in the log: 3, or 2.5 for free's partial loops."""
    return f"{int(passes)}" if passes == int(passes) else f"{float(passes):.2f}"


def check_finite(state, run):
    """Stop with a one-line error if a loss since the epoch began was NaN/inf. One host sync, only
    where state is about to be saved or the epoch ends; nothing of the bad state is saved."""
    bad = state.meter.bad_step
    if dist.all_sum((bad >= 0).float()).item() > 0:
        where = f"step {bad.item() + 1}" if bad.item() >= 0 else "a step on another rank"
        name = state.stage.name
        intact = f"The last good checkpoint, {run.folder.complete}, is intact" if run.folder.complete else \
            "No checkpoint of this run was saved yet"
        raise UserError(f"{name} stage: loss is not finite (nan/inf) at epoch {state.epoch + 1}, {where}; stopped "
                        f"without saving this state. {intact}: lower {state.stage.section}.lr "
                        f"(or {state.stage.settings_name}.rho) and go on with: {run.continue_with()}")


def stop(state, run):
    """End the run after a signal, once ``state`` is saved; the message says how to resume."""
    signum = run.stop.signum
    who = signal.Signals(signum).name if signum else "a signal on another rank"
    raise Interrupted(f"stopped by {who} in {state.stage.name} epoch {state.epoch + 1} after "
                      f"step {state.step}; saved {run.folder.last(state.stage.name)}. Resume with: {run.resume_command}",
                      signum or signal.SIGTERM)
