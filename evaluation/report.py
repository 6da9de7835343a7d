"""The report of a model: sparsity, accuracy under attack, worst case, sanity warnings, and what its
checkpoint or export file adds (compression, convergence, quantization, training method). The
training scripts and ``eval.py`` print it with ``format_report`` and write it as JSON."""

import torch

import admm as admm_lib
from pruning import quant
from attacks import PGD, AutoAttack
from evaluation.accuracy import correct_per_example, num_examples
from evaluation.checks import sanity_warnings
from training.methods import training_info


# --------------------------------------------------------------------------- report

SEED = 0  # the attacks' random starts in a final report: the training scripts' and eval.py's default alike


def report(model, cfg, test, device, attacks, limit=0, seed=None, checks=None, sweep=None):
    """Sparsity of ``model`` against ``cfg``'s prune settings plus, on the first ``limit`` test
    examples (0 = all), all on the same examples: accuracy under each of ``attacks`` ({name: attack
    or None for natural}); ``worst_case``, the fraction correct under every attack (natural
    included if run); the ``checks`` runs ({name: attack}, see ``check_attacks``); an eps sweep
    ``sweep`` ({attack name: {eps: attack}}); the sanity ``warnings``, followed by the flags of
    AutoAttack's own checks; the ``seconds`` each run took; and, per AutoAttack run, its library,
    version and attacks (``autoattack``). ``seed``: see ``_rng``. Returns the dict that
    ``eval.py --json`` writes."""
    checks, sweep = checks or {}, sweep or {}
    ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    runs = dict(attacks)
    runs.update({f"check:{k}": a for k, a in checks.items() if k not in attacks})
    runs.update({f"sweep:{name}@{e!r}": a for name, curve in sweep.items() for e, a in curve.items()})
    flagging = {k: a for k, a in runs.items() if isinstance(a, AutoAttack)}
    for a in flagging.values():
        a.pop_flags()  # drop any left from an earlier report with the same attack objects
    correct, seconds = correct_per_example(model, test, runs, cfg["data"]["test_batch_size"], device, limit, "eval",
                                           seed)
    n = num_examples(test, limit)

    def accuracy(key):
        return int(correct[key].sum()) / max(n, 1)

    acc = {name: accuracy(name) for name in attacks}
    worst = int(torch.stack([correct[k] for k in attacks]).all(0).sum()) / max(n, 1) if attacks else 0.0
    check_acc = {k: accuracy(k if k in attacks else f"check:{k}") for k in checks}
    curves = {name: [(e, accuracy(f"sweep:{name}@{e!r}")) for e in sorted(curve)] for name, curve in sweep.items()}
    num_classes = int(test.labels.max()) + 1

    pgd = next((a for a in attacks.values() if isinstance(a, PGD) and a.norm == "linf"), None)
    eps = next((a.eps for name, a in attacks.items() if a is not None and not name.endswith("_l2")), cfg["adv"]["eps"])
    rep = {"arch": cfg["model"]["arch"], "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
           "n_examples": n, "partial": n < len(test.labels),
           "sparsity": admm_lib.sparsity_report(model, ratios, cfg["prune"]["sparsity_type"]),
           "accuracy": acc, "worst_case": worst,
           "attack": {"eps": eps, "steps": pgd.steps if pgd else None, "step_size": pgd.step_size if pgd else None,
                      "restarts": pgd.restarts if pgd else None, "seed": seed,
                      "settings": {name: repr(a) for name, a in attacks.items() if a is not None}}}
    if checks:
        rep["checks"] = {k: {"accuracy": check_acc[k], "attack": repr(a)} for k, a in checks.items()}
    if sweep:
        rep["eps_sweep"] = {"eps": sorted({e for curve in sweep.values() for e in curve}),
                            "accuracy": {name: [a for _, a in c] for name, c in curves.items()}}
    if any(isinstance(a, AutoAttack) for a in attacks.values()):
        rep["autoattack"] = {name: {**a.info(), "seconds": round(seconds[name], 2)}
                             for name, a in attacks.items() if isinstance(a, AutoAttack)}
    rep["seconds"] = {k: round(s, 2) for k, s in seconds.items()}
    rep["warnings"] = sanity_warnings(acc, n, worst, check_acc, curves, num_classes) + [
        f"{k}: AutoAttack's own check: {flag}" for k, a in flagging.items() for flag in a.pop_flags()]
    return rep


def checkpoint_meta(ckpt, model, cfg):
    """What a training checkpoint dict says of its ``model`` beyond its weights, for ``final_report``:
    "format", "stage", "adversarial", "convergence" (ADMM's residuals and the pruned energy of each
    hard prune, by stage) and "quantization" (``quant.quantization_meta``)."""
    return {"format": "checkpoint", "stage": ckpt.get("stage"), "adversarial": ckpt.get("adversarial"),
            "convergence": (ckpt.get("metrics") or {}).get("convergence") or {},
            "quantization": quant.quantization_meta(model, cfg, ckpt.get("stage"), quant.recorded_scales(ckpt))}


def final_report(model, cfg, test, device, attacks, meta, limit=0, seed=SEED, checks=None, sweep=None, path=None):
    """The report that the training scripts print at the end and ``eval.py`` prints: ``report``'s
    figures completed with what the model's file says of it (``meta``: ``checkpoint_meta``, or
    ``deploy.formats.load_model``'s, which adds the export's "sparsity" and "compression").
    ``path``: the file, recorded with its format and stage under "checkpoint". The attacks' random
    starts come from ``seed``, not from the training's RNG, so ``eval.py --ckpt`` repeats a run's
    final figures."""
    rep = report(model, cfg, test, device, attacks, limit, seed, checks, sweep)
    if "sparsity" in meta:  # the pruned model's; an export's compact layers no longer show the zeros
        rep["sparsity"] = meta["sparsity"]
    if "compression" in meta:  # params / MACs dense, nonzero, compact; file sizes; or None
        rep["compression"] = meta["compression"]
    rep["convergence"] = meta["convergence"]
    if (meta.get("compression") or {}).get("storage_bits"):  # payload bits of the export, and dense float32
        rep["storage_bits"] = meta["compression"]["storage_bits"]
    if meta["quantization"]:
        rep["quantization"] = meta["quantization"]["layers"]
        rep["warnings"] += meta["quantization"]["warnings"]
    if meta["adversarial"] is not None:  # unknown for files that do not record it
        rep["training"] = training_info(cfg, meta["adversarial"])
    if path is not None:
        rep["checkpoint"] = {"path": path, "format": meta["format"], "stage": meta["stage"],
                             "adversarial": meta["adversarial"]}
    return rep


def format_report(rep):
    s = rep["sparsity"]
    lines = [f"{'layer':28} {'shape':>18} {'target':>7} {'params':>9} {'nonzero':>9} {'element':>8} "
             f"{'column':>7} {'filter':>7}"]
    for L in s["layers"]:
        lines.append(f"{L['name']:28} {'x'.join(map(str, L['shape'])):>18} {L['ratio']:7.3f} {L['params']:9d} "
                     f"{L['nonzero']:9d} {L['element']:8.4f} {L['column']:7.4f} {L['filter']:7.4f}")
    lines.append(f"{s['type']} pruning: overall sparsity {s['overall']:.4f} of pruned layers, "
                 f"compression {s['compression_rate']:.2f}x")
    if "prunable" in s:  # reports from before it lack the line
        p = s["prunable"]
        lines.append(f"all prunable layers: {p['zeros']:,d} of {p['params']:,d} weights pruned ({p['fraction']:.6f})")
    lines += format_quantization(rep.get("quantization"), rep.get("storage_bits"))
    if "training" in rep:
        t = rep["training"]
        lines.append(f"trained with: {t['method']} training, {t['loss']} loss"
                     + (f" (beta {t['beta']:g})" if t.get("beta") is not None else ""))
    a = rep["attack"]
    what = f"{rep['n_examples']} test examples" + (" (partial, --limit)" if rep["partial"] else "")
    lines.append(f"accuracy on {what}, eps={a['eps']:.4f}"
                 + (f", PGD steps={a['steps']} step={a['step_size']:.4f} restarts={a['restarts']}" if a["steps"] else ""))
    lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in rep["accuracy"].items())
                 + f"  worst_case={rep['worst_case']:.4f}")
    for name, aa in rep.get("autoattack", {}).items():
        lines.append(f"{name}: {aa['library']}, {aa['version']} version ({', '.join(aa['attacks'])}), "
                     f"{aa['norm']} eps={aa['eps']:.4f}, {aa['seconds']:.1f} s")
    if "checks" in rep:
        lines.append("sanity-check runs: " + "  ".join(f"{k}={v['accuracy']:.4f}" for k, v in rep["checks"].items()))
    if "eps_sweep" in rep:
        sw = rep["eps_sweep"]
        lines.append(f"eps sweep  {'eps':>10} " + " ".join(f"{e:7.4f}" for e in sw["eps"]))
        for name, accs in sw["accuracy"].items():
            lines.append(f"           {name:>10} " + " ".join(f"{v:7.4f}" for v in accs))
    sec = rep.get("seconds", {})
    if sec:
        runs = [f"{k}={v:.1f}" for k, v in sec.items() if ":" not in k]
        runs += [f"{kind}s={sum(v for k, v in sec.items() if k.startswith(kind + ':')):.1f}"
                 for kind in ("check", "sweep") if any(k.startswith(kind + ":") for k in sec)]
        lines.append("seconds: " + "  ".join(runs))
    lines += format_convergence(rep.get("convergence"))
    lines += [f"WARNING: {w}" for w in rep["warnings"]] or ["sanity checks: no warnings"]
    return "\n".join(lines)


def format_quantization(layers, storage_bits=None):
    """Report lines of the quantized layers ({name: {bits, distinct_nonzero, scale}}, see
    ``quant.quantization_report``) and of the model's storage (``exportfile.export_model``'s
    ``storage_bits``); none for a model without quantized layers."""
    if not layers:
        return []
    lines = [f"{'quantized layer':28} {'bits':>4} {'values':>6} {'allowed':>7} {'scale':>11}"]
    for n, q in layers.items():
        allowed = quant.allowed_values(q["bits"])
        scale = "off levels" if q["scale"] is None else f"{q['scale']:.5g}"
        lines.append(f"{n:28} {q['bits']:4d} {q['distinct_nonzero']:6d} {allowed:7d} {scale:>11}")
    if storage_bits:
        lines.append(format_storage(storage_bits))
    return lines


def format_storage(sb):
    """One line of ``exportfile.export_model``'s ``storage_bits`` ({export, float_export, dense_float32})."""
    vs_float = f"{sb['float_export'] / max(sb['export'], 1):.2f}x less than the float export, " if "float_export" in sb else ""
    return (f"storage (codes + sparse indices + float32 scales, float tensors at their size): {sb['export']:,d} bits, "
            f"{vs_float}{sb['dense_float32'] / max(sb['export'], 1):.2f}x less than dense float32")


def format_convergence(conv):
    """Report lines for a checkpoint's convergence figures (``metrics["convergence"]``): ADMM's
    residuals at its last Z/U update and the fraction of each layer's squared norm the hard prune
    removed; the same two for ADMM quantization (the ``quantize`` stage) and its hard quantization.
    A converged ADMM stage has small residuals and moves almost nothing at its hard step."""
    lines = []
    join = lambda d: "  ".join(f"{k}={v:.4f}" for k, v in d.items())  # noqa: E731
    for stage, what in (("admm", "ADMM"), ("quantize", "ADMM quantization")):
        if conv and "residual" in conv.get(stage, {}):
            a = conv[stage]
            lines.append(f"{what} at its last Z/U update (rho {a['rho']:.4g}): primal ||W-Z||/||W||  {join(a['residual'])}")
            if "dual_residual" in a:
                lines.append(f"  dual rho||Z-Z_prev||/||W||  {join(a['dual_residual'])}")
    for stage, key, what in (("retrain", "pruned_energy", "pruned energy at the hard prune (1 - ||Pi_S(W)||^2/||W||^2)"),
                             ("quantize", "quantized_energy", "energy moved by the hard quantization (||W - Q(W)||^2/||W||^2)")):
        if conv and key in conv.get(stage, {}):
            e = conv[stage][key]
            lines.append(f"{what}: {join(e)}  (largest {max(e.values(), default=0):.4f})")
    return lines
