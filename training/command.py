"""The shared pipeline behind ``main.py`` (natural training) and ``adv_main.py`` (adversarial).

The stages run by one loop (``train_stage``); what differs between them is a ``stages.Stage``
object, and what differs between training methods is a ``methods`` object:

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2, updating Z and U every few passes
    retrain   hard-prune W onto the sparsity set, then train with the masks held fixed
    quantize  (with ``quant.bits``) ADMM onto quantization levels, then hard quantization

Each stage starts from the previous stage's checkpoint in the run folder (or ``--init``) and
writes ``<out>/<stage>.pt`` (see ``rundir.py`` for the folder's files). The two entry scripts
differ only in the training method.
"""
import argparse
import contextlib
import itertools
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
import yaml

import admm as admm_lib
from pruning import allocation as allocation_lib
import data as data_lib
from training import distributed as dist
from pruning import quant
from training import tensorboard
from common import LOG, UserError, get_device, load_checkpoint, progress, seed_everything, setup_logging, write_json
from config import TABLES, load_config
from evaluation.accuracy import count_correct, evaluate, format_report, report, standard_attacks
from training.methods import Method, make_method, training_info
from models import load_weights, model_from_config
from training.rundir import RunFolder, default_out
from pruning.stages import make_stage, stage_names
from training.state import SELF_SIGNAL, GracefulStop, Interrupted, Schedule, TrainState, lr_at, wrap_for_training

# Natural training accuracy of adversarial training needs an extra clean forward: 4% of a PGD-10
# LeNet step, 12% of a PGD-3 VGG step (bench/train_step.py); measured on every 10th step only.
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
    resume_command: str


# --------------------------------------------------------------------------- the loop

def train_stage(name, model, run, init=None, resume=None):
    """Run stage ``name`` (one of ``stages.pipeline``'s) on ``model`` and save ``<out>/<name>.pt``;
    return that checkpoint.

    ``init`` is the checkpoint the stage starts from (its weights are already in ``model``; its
    masks are kept), None when pretraining from scratch. ``resume`` is this stage's
    ``<name>.last.pt``, from which training continues exactly where it stopped. The running state
    is saved to ``<name>.last.pt`` after every epoch (and every ``checkpoint.every_steps`` steps).
    Under torchrun every rank runs this; only rank 0 logs and saves.
    """
    cfg = run.cfg
    source = run.folder.last(name) if resume else f"the {init.get('stage')} checkpoint" if init else None
    index, stage = make_stage(name, model, cfg, resume or init, source, lambda path: load_checkpoint(path, run.device))
    state, scfg = TrainState(stage, model, run.method, cfg, run.device), cfg[stage.section]
    if resume:
        state.load_state_dict(resume)
        if dist.is_main():  # the rows written after that checkpoint are written again
            run.folder.truncate_metrics(state.log_bytes)
        LOG.info(f"== resuming {name} at epoch {state.epoch + 1}, step {state.step}")
    else:
        seed_everything(cfg["seed"] + index + 1000 * dist.rank())  # ranks: their own attack starts
        state.begin(init)
        if dist.is_main():  # rows of an earlier attempt at this stage and the ones after it
            run.folder.drop_metrics(stage_names(cfg)[index:])
    hook = admm_lib.attach_masks(state.optimizer, stage.weights, state.masks) if state.masks else None
    view = stage.network(model)  # what trains, is attacked and evaluated: the model, or a masked view of it
    nets = wrap_for_training(view, cfg, run.device)
    sched = Schedule(scfg["epochs"], data_lib.num_batches(run.train, cfg["data"]["batch_size"], world=dist.world()),
                     run.method.replays)
    LOG.info(f"== {name}: {scfg['epochs']} epochs, {run.method!r}{stage!r}"
             + (f", {dist.world()} processes" if dist.launched() else ""))
    loss_label = "loss" if run.method.loss.name == "ce" else run.method.loss.name  # names a TRADES / MART loss
    LOG.info(f"{'stage':8} {'ep':>4} {'lr':>8} {loss_label:>7} {'penalty':>8} {'tr_nat':>6} {'tr_adv':>6} "
             f"{'te_nat':>6} {'te_pgd':>6} {'resid':>6} {'time':>6}")
    eval_attacks = {"natural": None, "pgd": standard_attacks(cfg, ["pgd"])["pgd"]}
    for epoch in range(state.epoch, sched.loops):
        t0 = time.time()
        train = run_epoch(state, nets, sched, run)
        test = {"natural": math.nan, "pgd": math.nan}
        if sched.loop_reaches(cfg["eval"]["every"], epoch) or epoch + 1 == sched.loops:
            test, _ = evaluate(view, run.test, eval_attacks, cfg["data"]["test_batch_size"], run.device,
                               cfg["eval"]["limit"], desc="test")
        state.metrics = epoch_metrics(state, sched, epoch, train, test, time.time() - t0)
        log_epoch(state.metrics, run.folder)
        state.epoch, state.step = epoch + 1, 0
        state.meter.reset()
        save(state, run.folder, run.folder.last(name))
        if run.stop.requested():
            stop(state, run)
    if hook:
        hook.remove()
    stage.finish(state.masks)  # quantize: hard quantization; hydra, harp: the learned masks applied
    state.metrics["convergence"] = state.convergence()  # with the figures of finish
    ckpt = save(state, run.folder, run.folder.final(name))
    if dist.is_main() and os.path.exists(run.folder.last(name)):
        os.remove(run.folder.last(name))
    LOG.info(f"saved {run.folder.final(name)}")
    return ckpt


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
        loss, pen, logits = state.method.step(net, attack_model, x, y, state.optimizer, stage.penalty, state.precision)
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
            "admm_residual": stage.largest_residual() if sched.loop_reaches(stage.update_every, epoch) else math.nan,
            "time": seconds, "convergence": state.convergence()}


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
             f"{m['admm_residual']:6.4f} {m['time']:5.1f}s")
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
        raise UserError(f"{name} stage: loss is not finite (nan/inf) at epoch {state.epoch + 1}, {where}; stopped "
                        f"without saving this state. The last good checkpoint is intact: lower {state.stage.section}.lr "
                        f"(or {state.stage.settings}.rho) and continue with: {run.resume_command}")


def stop(state, run):
    """End the run after a signal, once ``state`` is saved; the message says how to resume."""
    signum = run.stop.signum
    who = signal.Signals(signum).name if signum else "a signal on another rank"
    raise Interrupted(f"stopped by {who} in {state.stage.name} epoch {state.epoch + 1} after "
                      f"step {state.step}; saved {run.folder.last(state.stage.name)}. Resume with: {run.resume_command}",
                      signum or signal.SIGTERM)


# --------------------------------------------------------------------------- command line

def parse_args(argv, adversarial):
    p = argparse.ArgumentParser(
        description=("Adversarial (PGD) training" if adversarial else "Natural training")
        + " with ADMM pruning: pretrain -> admm -> retrain.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--stage", default="all", help="stage to run: all (default), pretrain, admm or retrain; with "
                   "progressive rounds also admm.r1, retrain.r1, ...; with quant.bits also quantize")
    p.add_argument("--out", help="run folder (default: runs/<config stem>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; repeatable")
    p.add_argument("--init", help="checkpoint to start the (first) stage from, instead of the run folder's")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (finished stages are skipped)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing checkpoints already in --out")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="also write metrics.jsonl's rows as TensorBoard scalars to DIR (default: <out>/tensorboard; "
                        "needs the tensorboard package)")
    return p.parse_args(argv)


def run(argv=None, adversarial=True):
    """Entry point of main.py / adv_main.py. User errors exit with one line and status 2;
    SIGINT/SIGTERM save the state and exit with 128 + signal number."""
    setup_logging()  # the console, until the run folder's log.txt is added
    try:
        _run(parse_args(argv, adversarial), adversarial)
    except UserError as e:
        if dist.is_main():  # under torchrun every rank hits the same error; say it once
            _say(LOG.error, f"error: {e}")
        sys.exit(2)
    except Interrupted as e:
        _say(LOG.warning, str(e))
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


def _say(log, line):
    """``line`` through ``log`` (to the console and log.txt); a log.txt that cannot take it (a
    full disk) has already stopped logging, and the console has the line."""
    if not LOG.handlers:
        print(line, file=sys.stderr)
        return
    with contextlib.suppress(OSError):
        log(line)


def _resume_command(args, out, adversarial, resume=True):
    """The command that continues this run (``--resume``); with ``resume=False``, the command as
    it was given (with its ``--init`` and ``--overwrite``), to start it again."""
    cmd = ["python", "adv_main.py" if adversarial else "main.py", "--config", args.config, "--out", out]
    cmd += (["--stage", args.stage] if args.stage != "all" else [])
    cmd += [a for o in args.overrides for a in ("--set", o)]
    cmd += ["--resume"] if resume else (["--init", args.init] if args.init else []) + (["--overwrite"] if args.overwrite else [])
    return " ".join(shlex.quote(c) for c in cmd)


def _run(args, adversarial):
    """Check the command, take the run folder (rank 0) and run its stages. A failed write (a full
    disk) ends the run with one line: the file, why, the intact checkpoint, the command to go on."""
    cfg = load_config(args.config, args.overrides)
    out = args.out or default_out(args.config)
    names = stage_names(cfg)
    if args.stage not in ("all", *names):
        raise UserError(f"--stage {args.stage}: choose all or one of {', '.join(names)}")
    folder, stages = RunFolder(out), names if args.stage == "all" else [args.stage]
    device = dist.init(get_device(cfg["device"]))
    if args.resume and args.init:
        raise UserError("--resume continues from the run folder's own checkpoints; drop --init")
    with folder.locked() if dist.is_main() else contextlib.nullcontext():
        try:
            _run_stages(args, adversarial, cfg, folder, stages, device)
        except OSError as e:
            if e.filename is None:
                raise
            raise UserError(folder.write_failed(e, stages, _resume_command(args, out, adversarial),
                                                _resume_command(args, out, adversarial, resume=False))) from None


def _run_stages(args, adversarial, cfg, folder, stages, device):
    out, names = folder.path, stage_names(cfg)
    # Everything that can be checked is checked before any work: names, files, folder.
    train, test, info = data_lib.load_data(cfg)
    seed_everything(cfg["seed"])  # the initial weights depend on the seed only
    model = model_from_config(cfg, info, device)
    _check_pruning(cfg, model, stages)
    todo, init, resume = _plan(args, folder, stages, adversarial, model, cfg, device)
    changed = _prepare_folder(folder, cfg, args.resume)
    if args.tensorboard is not None and dist.is_main():  # the folder hands it every metrics row
        folder.mirror = tensorboard.TensorBoardLog(args.tensorboard or os.path.join(out, "tensorboard"))
    setup_logging(folder.file("log.txt") if dist.is_main() else None, enabled=dist.is_main())
    LOG.info(f"{'adv_main' if adversarial else 'main'}: config {args.config} -> {out} on {device}; "
             f"{cfg['model']['arch']} w={cfg['model']['width']}, {cfg['data']['dataset']} "
             f"({len(train.labels)} train / {len(test.labels)} test)"
             + (f"; {dist.world()} processes x batch {cfg['data']['batch_size']}" if dist.launched() else ""))
    if changed:
        LOG.warning(f"resuming with a config that differs from the run's in: {', '.join(changed)}")
    if not todo:
        LOG.info(f"all of {', '.join(stages)} already complete in {out}")
    method = make_method(cfg, adversarial, info, device)
    if method.attack:
        LOG.info(f"training attack ({method.name}): {method.attack!r}")

    with GracefulStop(device) as stop:
        ctx = RunContext(cfg, train, test, info, method, device, folder, stop, _resume_command(args, out, adversarial))
        for stage in todo:
            init = train_stage(stage, model, ctx, init, resume if stage == todo[0] else None)

    if args.stage == "all" and dist.is_main():
        final = folder.final(names[-1])
        ckpt = load_checkpoint(final)
        # the ratios the run pruned to (an allocation's, or HARP's learned ones) in the report's table
        rep = report(model, allocation_lib.resolved_config({**ckpt, "config": cfg}), test, device, standard_attacks(cfg))
        rep["training"] = training_info(cfg, adversarial)
        rep["convergence"] = ckpt.get("metrics", {}).get("convergence", {})
        # the layers on their levels, found as eval.py finds them
        q = quant.quantization_meta(model, quant.quantized_layers(cfg, names[-1], model), quant.recorded_scales(ckpt))
        if q:
            rep["quantization"] = q["layers"]
            rep["warnings"] += q["warnings"]
        LOG.info("final model (" + final + "):\n" + format_report(rep))
        write_json(folder.file("eval.json"), rep)
    if folder.mirror:
        folder.mirror.close()
    # The other ranks wait for rank 0's final report: a rank that tears the process group down
    # while a peer still uses it can abort (seen with gloo).
    dist.barrier()


def _check_pruning(cfg, model, stages):
    try:
        ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if not ratios and not cfg["prune"]["target"] and stages != ["pretrain"]:
        raise UserError("prune.prune_ratios prunes no layer (empty, or all ratios 0); give ratios or an overall "
                        "prune.target, or run only --stage pretrain")
    if cfg["prune"]["allocation"] == "from_checkpoint" and not os.path.isfile(cfg["prune"]["rates_from"]):
        raise UserError(f"prune.rates_from: {cfg['prune']['rates_from']} does not exist; give a checkpoint of a "
                        "pruning stage (e.g. a HARP run's retrain.pt)")
    if cfg["prune"]["target"] and stages != ["pretrain"]:
        allocation_lib.budget(model, cfg["prune"])  # a target the fixed layers leave room for
    try:
        bits = quant.resolve_bits(model, cfg["quant"]["bits"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg["quant"]["bits"] and not bits:
        raise UserError("quant.bits quantizes no layer (all bits 0); give bits, or leave quant.bits empty")
    last = list(admm_lib.prunable_weights(model))[-1]
    if cfg["prune"]["sparsity_type"] == "filter" and last in ratios:
        raise UserError(f"prune.prune_ratios.{last}: filter pruning the output layer would delete classes; "
                        f"set its ratio to 0 or use irregular/column pruning for it")


def _plan(args, folder, stages, adversarial, model, cfg, device):
    """(the stages still to run, the checkpoint the first starts from, or its ``.last.pt`` to
    resume); ``model`` gets the weights it starts from (the final weights when all is done)."""
    existing = folder.existing(stages)
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{folder.path} already holds {', '.join(existing)}; continue that run with --resume, "
                        f"replace it with --overwrite, or choose another --out")
    todo = list(stages)
    if args.resume:
        if not existing:
            raise UserError(f"nothing to resume in {folder.path}: no checkpoint of stage(s) {', '.join(stages)}; "
                            f"run without --resume")
        while todo and folder.status(todo[0]) == "done":
            _check_script(load_checkpoint(folder.final(todo[0])), folder.final(todo.pop(0)), adversarial)
        if todo and folder.status(todo[0]) == "partial":
            resume = load_checkpoint(folder.last(todo[0]), device)
            _check_script(resume, folder.last(todo[0]), adversarial)
            load_weights(model, resume, folder.last(todo[0]), cfg)  # checks arch and width
            folder.complete = folder.last(todo[0])
            return todo, None, resume
    if not todo:
        if args.stage == "all":  # everything done already: report on the final model
            final = folder.final(stage_names(cfg)[-1])
            load_weights(model, load_checkpoint(final, device), final, cfg)
            folder.complete = final
        return todo, None, None
    names = stage_names(cfg)
    prev = names[names.index(todo[0]) - 1] if todo[0] != "pretrain" else None
    start = args.init or (folder.final(prev) if prev else None)
    if args.init and not os.path.isfile(args.init):
        raise UserError(f"--init {args.init} does not exist")
    if start and not os.path.isfile(start):
        raise UserError(f"stage {todo[0]} starts from {start}, which does not exist; run --stage {prev} "
                        f"first (same --out) or pass --init CKPT")
    init = load_checkpoint(start, map_location=device) if start else None
    if init:
        load_weights(model, init, start, cfg)
        folder.complete = start
    return todo, init, None


def _check_script(ckpt, path, adversarial):
    if ckpt.get("adversarial") != adversarial:
        raise UserError(f"{path} was written by {'adv_main.py' if ckpt.get('adversarial') else 'main.py'}; "
                        "resume the run with that script")


def _prepare_folder(folder, cfg, resume):
    """Create the folder, clear killed saves' temp files and write the resolved config; return the
    config keys that differ from the run's when resuming. Only rank 0 writes (it owns the folder)."""
    try:
        os.makedirs(folder.path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to run folder {folder.path}: {e.strerror}; choose another --out") from None
    if not dist.is_main():
        return []
    folder.remove_temp()
    changed = []
    if resume and os.path.isfile(folder.file("config.yaml")):
        with open(folder.file("config.yaml")) as f:
            old, new = _flat(yaml.safe_load(f)), _flat(cfg)
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    folder.write_text("config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return changed


def _flat(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and f"{prefix}{k}" not in TABLES:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
