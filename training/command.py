"""The training command behind ``main.py`` (natural training) and ``adv_main.py`` (adversarial):
its command line, the plan of what to run or resume, the run folder's preparation, the checks of
the pruning settings before any work, and the final report:

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2, updating Z and U every few passes
    retrain   hard-prune W onto the sparsity set, then train with the masks held fixed
    quantize  (with ``quant.bits``) ADMM onto quantization levels, then hard quantization

Each stage starts from the previous stage's checkpoint in the run folder (or ``--init``) and
writes ``<out>/<stage>.pt`` (see ``training/rundir.py`` for the folder's files); one loop runs
them all (``training.loop.train_stage``). The two entry scripts differ only in the training method.
"""
import contextlib
import os
import shlex
import signal
import sys

import yaml

import admm as admm_lib
from pruning import allocation as allocation_lib
import data as data_lib
from training import distributed as dist
from pruning import quant
from training import tensorboard
from common import (LOG, ArgumentParser, UserError, get_device, load_checkpoint, seed_everything, set_deterministic,
                    setup_logging, write_json)
from config import TABLES, load_config, warnings_of
from evaluation.accuracy import standard_attacks
from evaluation.report import checkpoint_meta, final_report, format_report
from training.methods import make_method
from models import load_weights, model_from_config
from training.rundir import RunFolder, default_out
from deploy import formats
from models import outside
from pruning.plan import stage_names
from training.stops import GracefulStop, Interrupted
from training.loop import RunContext, train_stage


# --------------------------------------------------------------------------- command line

def parse_args(argv, adversarial):
    p = ArgumentParser(
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
    except OSError as e:  # not a file of the run folder (those are _run's): the saved checkpoints are intact
        if dist.is_main():
            print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the run folder was taken: nothing of it was written
        print("stopped", file=sys.stderr)
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
    resume, rerun = _resume_command(args, out, adversarial), _resume_command(args, out, adversarial, resume=False)
    with folder.locked() if dist.is_main() else contextlib.nullcontext():
        try:
            _run_stages(args, adversarial, cfg, folder, stages, device)
        except OSError as e:
            if e.filename is None:
                raise
            raise UserError(folder.write_failed(e, stages, resume, rerun)) from None
        except KeyboardInterrupt:  # a second signal: stopped at once; say what there is to go on from
            again = (f"the last saved checkpoints in {out} are intact; continue with: {resume}"
                     if folder.existing(stages) else f"no checkpoint of this run was saved yet; start it again "
                                                     f"with: {rerun}")
            raise Interrupted(f"stopped; {again}", signal.SIGINT) from None


def _run_stages(args, adversarial, cfg, folder, stages, device):
    out, names = folder.path, stage_names(cfg)
    # Everything that can be checked is checked before any work: names, files, folder.
    train, val, test, info = data_lib.load_splits(cfg)
    set_deterministic(cfg["deterministic"])
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
             f"({len(train.labels)} train / {len(test.labels)} test"
             + (f" / {len(val.labels)} validation, held out of train)" if len(val.labels) else ")")
             + (f"; {dist.world()} processes x batch {cfg['data']['batch_size']}" if dist.launched() else ""))
    if changed:
        LOG.warning(f"resuming with a config that differs from the run's in: {', '.join(changed)}")
    for line in warnings_of(cfg):  # stdout and log.txt: stderr is for the one line of an error
        LOG.info(f"warning: {line}")
    if not todo:
        LOG.info(f"all of {', '.join(stages)} already complete in {out}")
    method = make_method(cfg, adversarial, info, device)
    if method.attack:
        LOG.info(f"training attack ({method.name}): {method.attack!r}")

    with GracefulStop(device) as stop:
        method.attack = stop.guard(method.attack)  # a stop request ends even an endless attack
        ctx = RunContext(cfg, train, test, info, method, device, folder, stop, _resume_command(args, out, adversarial),
                         _resume_command(args, out, adversarial, resume=False), tuple(stages), val)
        for stage in todo:
            init = train_stage(stage, model, ctx, init, resume if stage == todo[0] else None)

    if args.stage == "all" and dist.is_main():
        final = folder.final(names[-1])
        ckpt = load_checkpoint(final)
        # the ratios the run pruned to (an allocation's, or HARP's learned ones) in the report's table
        rcfg = allocation_lib.resolved_config({**ckpt, "config": cfg})
        rep = final_report(model, rcfg, test, device, standard_attacks(cfg), checkpoint_meta(ckpt, model, cfg))
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
    rates_from = cfg["prune"]["rates_from"]
    if cfg["prune"]["allocation"] == "from_checkpoint" and not os.path.isfile(rates_from):
        raise UserError(f"prune.rates_from: {rates_from} {'is a folder' if os.path.isdir(rates_from) else 'does not exist'}"
                        "; give a checkpoint of a pruning stage (e.g. a HARP run's retrain.pt)")
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
            _check_script(folder.read_checkpoint(folder.final(todo[0])), folder.final(todo.pop(0)), adversarial)
        if todo and folder.status(todo[0]) == "partial":
            resume = folder.read_checkpoint(folder.last(todo[0]), device)
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
    if args.init and not os.path.exists(args.init):
        raise UserError(f"--init {args.init} does not exist")
    if start and not os.path.exists(start):
        raise UserError(f"stage {todo[0]} starts from {start}, which does not exist; run --stage {prev} "
                        f"first (same --out) or pass --init CKPT")
    init = None
    if args.init:  # this project's checkpoint, or outside weights (a state dict, HYDRA's, HARP's) as one
        init = _to(formats.read_checkpoint(args.init, cfg, "--init", model, run_config=True), device)
        if init.get("stage") == "outside":
            LOG.info(f"--init {args.init}: outside weights" + (f"; {outside.describe_masks(init['masks'])}"
                                                               if init["masks"] else ""))
    elif start:
        init = load_checkpoint(start, map_location=device)
    if init:
        load_weights(model, init, start, cfg)
        folder.complete = start
    return todo, init, None


def _to(ckpt, device):
    """``ckpt``'s model weights and masks on ``device``."""
    for key in ("model", "masks"):
        if isinstance(ckpt.get(key), dict):
            ckpt[key] = {n: t.to(device) for n, t in ckpt[key].items()}
    return ckpt


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
    old = folder.read_config() if resume else None
    if old is not None:
        new = _flat(cfg)
        old = _flat(old)
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
