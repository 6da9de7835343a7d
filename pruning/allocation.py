"""Layer-wise allocation: how one overall pruning target is split between the prunable layers.

``prune.target`` (a fraction of all prunable weights, 0 = off) with ``prune.allocation``:

    uniform          every layer at (nearly) the same ratio
    global           one magnitude threshold across the layers
    lamp             LAMP scores (Lee et al., ICLR 2021, Eq. 2), one threshold across the layers
    erk              Erdos-Renyi-kernel densities (Evci et al., ICML 2020, Sec. 3(1))
    from_checkpoint  the keep rates a HARP run learned, read from its checkpoint (``prune.rates_from``)

Entries of ``prune.prune_ratios`` win for the layers they name; the other prunable layers share
what is left of the budget, so that the pruned counts of all prunable layers sum to exactly
``round(target * total)``. Every layer keeps at least one weight (a ratio below 1, as everywhere).
Without a target (``prune.target: 0``) the table alone gives the ratios, as it always did.

The allocation is computed once, from the weights the pruning starts from (the pretrained model),
and saved in every later checkpoint (``"allocation"``), so the later stages, ``--resume`` and
``eval.py`` use the same ratios however the weights change. HARP replaces it with the rates it
learned (``pruning.learned.HARP.finish``).

Counts are integers; a layer's ratio is ``pruned / n``, for which ``admm.n_pruned(n, ratio)``
gives back exactly ``pruned``.
"""
import itertools
import math

import torch

import admm as admm_lib
from common import LOG, UserError

RULES = ("uniform", "global", "lamp", "erk", "from_checkpoint")


# --------------------------------------------------------------------------- pure rules

def lamp_scores(w):
    """LAMP score of every weight of ``w`` (Lee et al., ICLR 2021, Eq. 2), same shape as ``w``:

        score(u) = w[u]^2 / sum_{v >= u} w[v]^2

    with the layer's weights sorted by ascending magnitude (ties by flat index), so the sum runs
    over the weight itself and every weight at least as large. The largest weight scores 1, every
    score is in (0, 1] (0 for a weight that is 0 while a larger one is not)."""
    sq = w.detach().double().flatten().square()
    order = torch.sort(sq, stable=True).indices
    tail = sq[order].flip(0).cumsum(0).flip(0)  # sum over the sorted positions v >= u
    scores = torch.empty_like(sq)
    scores[order] = sq[order] / tail.clamp_min(1e-300)
    return scores.view_as(w)


def erk_raw(shape):
    """Erdos-Renyi(-kernel) density before scaling (Evci et al., ICML 2020, Sec. 3(1)): the sum of
    a weight's dimensions over their product, (c_out + c_in + kh + kw) / (c_out c_in kh kw) for a
    conv kernel, (n_out + n_in) / (n_out n_in) for a linear layer."""
    return sum(shape) / math.prod(shape)


def erk_keep(shapes, keep):
    """Kept weights per layer ({name: float}) under ERK for ``keep`` kept weights in all: layer l
    keeps n_l min(1, eps * erk_raw_l), eps chosen so the total is ``keep``; a layer the scale
    would make denser than 1 is kept dense and eps is solved again without it (RigL's rule)."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    dense = set()
    while True:
        free = [n for n in shapes if n not in dense]
        eps = (keep - sum(sizes[n] for n in dense)) / sum(sizes[n] * erk_raw(shapes[n]) for n in free)
        over = [n for n in free if eps * erk_raw(shapes[n]) > 1]
        if not over:
            return {n: sizes[n] if n in dense else sizes[n] * eps * erk_raw(shapes[n]) for n in shapes}
        dense.add(max(over, key=lambda n: erk_raw(shapes[n])))  # the densest first, then solve again


def prune_lowest(scores, n_prune):
    """{name: pruned count} when the ``n_prune`` lowest of all layers' ``scores`` ({name: tensor})
    are pruned together (one threshold across the layers). Each layer's highest score is kept (a
    layer is never emptied); ties go by layer order, then flat index (the later one is kept)."""
    names = list(scores)
    flat = [scores[n].detach().double().flatten() for n in names]
    rest = [torch.cat([f[:i], f[i + 1:]]) for f, i in ((f, int(torch.argmax(f))) for f in flat)]
    if not 0 <= n_prune <= sum(len(r) for r in rest):
        raise ValueError(f"cannot prune {n_prune} weights while keeping one per layer")
    layer = torch.cat([torch.full((len(r),), k) for k, r in enumerate(rest)])
    lowest = torch.sort(torch.cat(rest), stable=True).indices[:n_prune]
    counts = torch.bincount(layer[lowest], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


def apportion(quota, sizes, total):
    """Integer kept counts ({name: int}), each in [1, sizes[name]], summing to exactly ``total``.

    The shares are proportional to ``quota`` ({name: float >= 0}) where the bounds allow:
    s_l = clamp(lam q_l, 1, n_l), with lam solved (by bisection) so that sum_l s_l = total; a quota
    of 0 counts as a tiny positive one, so such a layer gets weights only once the others are full.
    The shares are then rounded by the largest-remainder (Hamilton) method: floors, and one more
    for the largest fractional parts (ties: the earlier layer) until the total is met."""
    names = list(sizes)
    if not len(names) <= total <= sum(sizes.values()):
        raise ValueError(f"cannot keep {total} weights in {len(names)} layers of {sum(sizes.values())}")
    tiny = 1e-12 * max(max(quota.values()), 1e-300)
    q = {n: max(float(quota[n]), tiny) for n in names}

    def shares(lam):
        return {n: min(float(sizes[n]), max(1.0, lam * q[n])) for n in names}

    lo, hi = 0.0, 1.0
    while sum(shares(hi).values()) < total:
        hi *= 2
    for _ in range(200):  # sum of shares is non-decreasing in lam
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(shares(mid).values()) < total else (lo, mid)
    share = shares(hi)
    counts = {n: min(sizes[n], max(1, math.floor(share[n]))) for n in names}
    order = sorted(names, key=lambda n: -(share[n] - counts[n]))  # largest remainder first, stable
    for n in itertools.cycle(order):
        if sum(counts.values()) >= total:
            break
        counts[n] += counts[n] < sizes[n]
    for n in itertools.cycle(reversed(order)):  # only if float error put a share just above an integer
        if sum(counts.values()) <= total:
            break
        counts[n] -= counts[n] > 1
    return counts


# --------------------------------------------------------------------------- the rules as objects

class Uniform:
    """Every free layer at the same ratio, up to the rounding that makes the total exact."""
    name = "uniform"

    def keep(self, weights, keep):
        return apportion({n: w.numel() for n, w in weights.items()}, _sizes(weights), keep)


class ByScore:
    """One threshold across the layers on a per-weight score (higher is kept)."""

    def __init__(self, name, score):
        self.name, self.score = name, score

    def keep(self, weights, keep):
        pruned = prune_lowest({n: self.score(w) for n, w in weights.items()}, sum(_sizes(weights).values()) - keep)
        return {n: w.numel() - pruned[n] for n, w in weights.items()}


class ERK:
    name = "erk"

    def keep(self, weights, keep):
        quota = erk_keep({n: tuple(w.shape) for n, w in weights.items()}, keep)
        return apportion(quota, _sizes(weights), keep)


class Learned:
    """The keep rates of an earlier allocation (a HARP run's learned rates), rescaled to this
    target: layer l keeps in proportion to n_l (1 - r_l)."""
    name = "from_checkpoint"

    def __init__(self, ratios, path):
        self.ratios, self.path = ratios, path

    def keep(self, weights, keep):
        missing = [n for n in weights if n not in self.ratios]
        if missing:
            raise UserError(f"prune.rates_from: {self.path} has no rate for {', '.join(missing)}; "
                            f"it allocates {', '.join(self.ratios)}")
        quota = {n: w.numel() * (1 - self.ratios[n]) for n, w in weights.items()}
        return apportion(quota, _sizes(weights), keep)


def _sizes(weights):
    return {n: w.numel() for n, w in weights.items()}


def make_rule(pcfg, load=None):
    """The allocation rule object of ``prune.allocation``; ``load(path)`` reads a checkpoint."""
    name = pcfg["allocation"]
    if name == "from_checkpoint":
        ckpt = load(pcfg["rates_from"])
        if not ckpt.get("allocation"):
            raise UserError(f"prune.rates_from: {pcfg['rates_from']} holds no allocation; give a checkpoint "
                            "of a pruning stage (e.g. a HARP run's harp.pt or retrain.pt)")
        return Learned(ckpt["allocation"]["ratios"], pcfg["rates_from"])
    return {"uniform": Uniform(), "global": ByScore("global", lambda w: w.detach().abs()),
            "lamp": ByScore("lamp", lamp_scores), "erk": ERK()}[name]


# --------------------------------------------------------------------------- the allocation

class Allocation:
    """The per-layer prune ratios of a run ({name: ratio}, pruned layers only) and what they were
    made from: ``rule`` (``table`` without a target, else the rule's name, or ``harp`` for rates
    HARP learned), the overall ``target`` (0: none), the layers whose ratio the table fixed
    (``fixed``), and ``key``, the config settings it answers (``config_key``)."""

    def __init__(self, ratios, rule="table", target=0.0, fixed=(), key=None):
        self.ratios, self.rule, self.target = dict(ratios), rule, float(target)
        self.fixed, self.key = list(fixed), key

    def counts(self, sizes):
        """{name: pruned weights} of each allocated layer of ``sizes`` ({name: n})."""
        return {n: admm_lib.n_pruned(sizes[n], r) for n, r in self.ratios.items()}

    def state_dict(self):
        return {"ratios": self.ratios, "rule": self.rule, "target": self.target, "fixed": self.fixed, "key": self.key}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["ratios"], state["rule"], state["target"], state.get("fixed", ()), state.get("key"))

    def lines(self, weights):
        """Log lines: the rule, the overall count over all prunable ``weights``, each layer's ratio."""
        sizes = _sizes(weights)
        counts = self.counts(sizes)
        total, pruned = sum(sizes.values()), sum(counts.values())
        head = (f"allocation {self.rule}" + (f", target {self.target:.4f}" if self.target else " (prune.prune_ratios)")
                + f": {pruned:,d} of {total:,d} prunable weights pruned ({pruned / total:.6f})")
        return [head] + [f"   {n:28} {counts.get(n, 0):>9,d} of {sizes[n]:>9,d}  ratio {self.ratios.get(n, 0.0):.6f}"
                         + ("  (prune.prune_ratios)" if n in self.fixed else "") for n in sizes]


def config_key(pcfg):
    """The settings an allocation is made from; a checkpoint's allocation is reused only for the same."""
    return {"target": pcfg["target"], "allocation": pcfg["allocation"], "rates_from": pcfg["rates_from"],
            "prune_ratios": dict(pcfg["prune_ratios"])}


def fixed_ratios(model, pcfg):
    """{name: ratio} that ``prune.prune_ratios`` fixes under a target (zeros included: a layer kept
    dense). A table that names every prunable layer leaves nothing to allocate: the target then
    replaces it (``allocate`` logs so), so ``--set prune.target=...`` works on a config with a table."""
    table = admm_lib.resolve_names(model, pcfg["prune_ratios"], "prune.prune_ratios")
    if set(table) == set(admm_lib.prunable_weights(model)):
        return {}
    return {n: float(r) for n, r in table.items()}


def budget(model, pcfg):
    """(fixed {name: ratio}, weights the other layers keep together) under ``prune.target``; a
    one-line ``UserError`` when the fixed layers leave no feasible budget (each layer keeps >= 1)."""
    sizes = _sizes(admm_lib.prunable_weights(model))
    fixed = fixed_ratios(model, pcfg)
    free = [n for n in sizes if n not in fixed]
    total = sum(sizes.values())
    keep_free = total - round(pcfg["target"] * total) - sum(sizes[n] - admm_lib.n_pruned(sizes[n], r)
                                                           for n, r in fixed.items())
    if not free or not len(free) <= keep_free <= sum(sizes[n] for n in free):
        raise UserError(f"prune.target={pcfg['target']}: the layers prune.prune_ratios fixes leave "
                        f"{keep_free:,d} weights to keep in the {len(free)} other layers "
                        f"({sum(sizes[n] for n in free):,d} weights); lower those ratios or change the target")
    return fixed, keep_free


def allocate(model, pcfg, load=None):
    """The ``Allocation`` of ``pcfg`` (the config's ``prune`` section) for ``model``'s current
    weights. ``load(path)``: reads the checkpoint of ``prune.rates_from``."""
    key = config_key(pcfg)
    if not pcfg["target"]:
        return Allocation(admm_lib.resolve_ratios(model, pcfg["prune_ratios"]), key=key)
    weights = admm_lib.prunable_weights(model)
    sizes = _sizes(weights)
    fixed, keep_free = budget(model, pcfg)
    if pcfg["prune_ratios"] and not fixed:
        LOG.warning(f"prune.target={pcfg['target']} replaces prune.prune_ratios, which names every prunable "
                    "layer (nothing would be left to allocate); to fix some layers, name only those")
    pruned = {n: admm_lib.n_pruned(sizes[n], r) for n, r in fixed.items()}
    free = {n: w for n, w in weights.items() if n not in fixed}
    rule = make_rule(pcfg, load)
    kept = rule.keep(free, keep_free)
    pruned.update({n: sizes[n] - kept[n] for n in free})
    ratios = {n: pruned[n] / sizes[n] for n in weights}
    assert all(admm_lib.n_pruned(sizes[n], r) == pruned[n] for n, r in ratios.items())
    return Allocation(ratios, rule.name, pcfg["target"], list(fixed), key)


def resolve(model, cfg, ckpt=None, source=None, load=None):
    """The allocation a stage prunes to: ``ckpt``'s (the checkpoint the stage starts or resumes
    from, read from ``source``) when it was made for the same settings, else one computed now from
    ``model``'s weights (the weights the pruning starts from), and logged."""
    pcfg = cfg["prune"]
    saved = (ckpt or {}).get("allocation")
    if saved and saved.get("key") == config_key(pcfg):
        return Allocation.from_state_dict(saved)
    if saved:
        LOG.warning(f"{source}'s allocation was made for other prune settings ({saved.get('key')}); "
                    "computing it again from its weights")
    alloc = allocate(model, pcfg, load)
    if pcfg["target"]:
        LOG.info("\n".join(alloc.lines(admm_lib.prunable_weights(model)))
                 + (f"\n   (from {source}'s weights)" if source else ""))
    return alloc


def resolved_config(ckpt):
    """A checkpoint's config with its allocation written into ``prune.prune_ratios`` (and no
    target), so reports and exports show the ratios the run pruned to. Unchanged for a
    checkpoint without an allocation (one from before allocations, or of pretraining)."""
    cfg = ckpt["config"]
    alloc = ckpt.get("allocation")
    if not alloc:
        return cfg
    return {**cfg, "prune": {**cfg["prune"], "prune_ratios": dict(alloc["ratios"]), "target": 0.0}}
