"""Evaluation shared by the training scripts and ``eval.py``: accuracy under attacks on the same
examples, the sparsity + accuracy report, and building a model from a config or checkpoint."""
import sys

import torch

import admm as admm_lib
import data as data_lib
from attacks import FGSM, PGD
from common import UserError
from models import build_model


def progress(iterable, total, desc):
    """A tqdm bar on terminals; silent when stderr is not a terminal (logs, CI, batch jobs)."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def model_from_config(cfg, info, device):
    m = cfg["model"]
    return build_model(m["arch"], m["width"], info.num_classes, info.in_channels, info.image_size,
                       info.mean, info.std).to(device)


def load_weights(model, ckpt, path, cfg):
    """Load ``ckpt``'s weights into ``model`` after checking it was built for the same model."""
    for key in ("arch", "width"):
        if ckpt.get(key) != cfg["model"][key]:
            raise UserError(f"{path} holds model.{key}={ckpt.get(key)!r} but the config says "
                            f"{cfg['model'][key]!r}; use a matching config or --set model.{key}={ckpt.get(key)}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model ({str(e).splitlines()[0]}); "
                        f"was it trained on another dataset?") from None


@torch.no_grad()
def count_correct(model, x, y):
    return (model(x).argmax(1) == y).sum()


def evaluate(model, split, attacks, batch_size, device, limit=0, desc="eval"):
    """Accuracy (fraction in [0, 1]) of ``model`` on the first ``limit`` examples of ``split``
    under each attack in ``attacks`` ({name: attack or None for natural}). Every attack sees
    the same examples. Returns ({name: accuracy}, number of examples)."""
    was_training = model.training
    model.eval()
    correct = {name: torch.zeros((), device=device, dtype=torch.long) for name in attacks}
    n = 0
    try:
        for x, y in progress(data_lib.batches(split, batch_size, device, limit=limit),
                             data_lib.num_batches(split, batch_size, limit), desc):
            for name, attack in attacks.items():
                correct[name] += count_correct(model, x if attack is None else attack(model, x, y), y)
            n += len(y)
    finally:
        model.train(was_training)
    return {name: c.item() / max(n, 1) for name, c in correct.items()}, n


def report(model, cfg, test, device, attacks, limit=0):
    """Sparsity of ``model`` against ``cfg``'s prune settings plus accuracies under ``attacks``
    on the first ``limit`` test examples. Returns the dict that ``eval.py --json`` writes."""
    ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    acc, n = evaluate(model, test, attacks, cfg["data"]["test_batch_size"], device, limit)
    pgd = next((a for a in attacks.values() if isinstance(a, PGD)), None)
    eps = next((a.eps for a in attacks.values() if a is not None), cfg["adv"]["eps"])
    return {"arch": cfg["model"]["arch"], "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
            "n_examples": n, "partial": n < len(test.labels),
            "sparsity": admm_lib.sparsity_report(model, ratios, cfg["prune"]["sparsity_type"]),
            "accuracy": acc,
            "attack": {"eps": eps, "steps": pgd.steps if pgd else None, "step_size": pgd.step_size if pgd else None,
                       "restarts": pgd.restarts if pgd else None}}


def format_report(rep):
    s = rep["sparsity"]
    lines = [f"{'layer':28} {'shape':>18} {'target':>7} {'params':>9} {'nonzero':>9} {'element':>8} "
             f"{'column':>7} {'filter':>7}"]
    for L in s["layers"]:
        lines.append(f"{L['name']:28} {'x'.join(map(str, L['shape'])):>18} {L['ratio']:7.3f} {L['params']:9d} "
                     f"{L['nonzero']:9d} {L['element']:8.4f} {L['column']:7.4f} {L['filter']:7.4f}")
    lines.append(f"{s['type']} pruning: overall sparsity {s['overall']:.4f} of pruned layers, "
                 f"compression {s['compression_rate']:.2f}x")
    a = rep["attack"]
    what = f"{rep['n_examples']} test examples" + (" (partial, --limit)" if rep["partial"] else "")
    lines.append(f"accuracy on {what}, eps={a['eps']:.4f}"
                 + (f", PGD steps={a['steps']} step={a['step_size']:.4f} restarts={a['restarts']}" if a["steps"] else ""))
    lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in rep["accuracy"].items()))
    return "\n".join(lines)


def standard_attacks(cfg, names=("natural", "fgsm", "pgd"), eps=None, steps=None, step_size=None, restarts=None):
    """{name: attack} for ``names``; defaults: eps from ``adv``, PGD settings from ``eval``."""
    e = cfg["eval"]
    eps = cfg["adv"]["eps"] if eps is None else eps
    table = {"natural": lambda: None, "fgsm": lambda: FGSM(eps),
             "pgd": lambda: PGD(eps, e["step_size"] if step_size is None else step_size,
                                e["steps"] if steps is None else steps, e["restarts"] if restarts is None else restarts,
                                cfg["adv"]["random_start"])}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"--attacks: unknown attack(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return {n: table[n]() for n in names}
