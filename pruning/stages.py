"""The stages as objects with the same hooks; ``engine.train_stage`` runs any of them:

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2 (ICCV'19 Eq. 6), Z/U updated every
              ``prune.update_every`` passes over the data (Eq. 7-8)
    retrain   hard-prune W onto the sparsity set (W = Pi_S(W)), then train with the masks held fixed
    quantize  (when ``quant.bits`` is set) ADMM as in admm, Z projected onto each layer's
              quantization levels (quant.py), the masks held; then hard quantization W = Q(W)

Hooks (all a stage needs to differ; the loop never asks which stage it runs):

    begin(masks)       a fresh start: given the masks inherited from the previous stage, set up
                       this stage's state and return the masks to hold during it
    penalty            None, or a function returning the term added to the loss
    update_every       passes over the data between ``update`` calls (0: never)
    lr_clock(p, E)     where the lr schedule stands after p of E passes (ADMM may restart it)
    update()           the periodic update; returns named figures for the log and metrics.jsonl
    finish()           after the last epoch, before the final checkpoint (quantize: hard quantization)
    describe_update(f) the log line for those figures
    figures            the stage's convergence figures so far (ADMM: the last update's residuals;
                       retrain: the hard prune's pruned energy; quantize: also the hard
                       quantization's energy and scales), kept in the checkpoint's metrics
    state_dict() / load_state_dict(state, device)   the stage's state in the checkpoint ("admm")
"""
import math

import torch
from torch import nn

import admm as admm_lib
from pruning import allocation as allocation_lib
from training import distributed as dist
from pruning import quant
from pruning import scores as scores_lib
from common import LOG


class Stage:
    """Defaults shared by the stages: no penalty, no update, no state of its own. ``kind`` names
    the stage class, ``section`` the config section it trains with (epochs, optimizer, lr),
    ``settings`` the one its method's settings come from (rho, ...), and ``name`` its checkpoint
    files (``admm.r1`` for progressive rounds)."""
    kind = section = None
    settings = "prune"
    prunes = True  # logged in the stage's header
    update_every = 0
    penalty = None

    def __init__(self, weights, ratios, pcfg, name=None, scfg=None, allocation=None):
        """``weights``: {name: parameter} of the prunable layers; ``ratios``: {name: ratio} of the
        pruned ones (this round's); ``pcfg``: the config's ``prune`` section; ``name``: default
        ``kind``; ``scfg``: the config section it trains with (its ``epochs``: the passes over the
        data the stage makes); ``allocation``: the run's ``allocation.Allocation`` (its final
        ratios), saved in the stage's checkpoints."""
        self.weights, self.ratios, self.pcfg, self.name = weights, ratios, pcfg, name or self.kind
        self.scfg, self.allocation = scfg or {}, allocation
        self.epochs, self.figures = self.scfg.get("epochs", 0), {}

    @classmethod
    def build(cls, model, cfg, name, step=None, allocation=None):
        """The stage ``name`` for ``model`` under ``cfg``: the ``allocation``'s ratios as its
        round ``step`` (a ``TargetFraction`` or ``RateStep``; default the whole target) scales
        them, the ``prune`` settings, its section's settings."""
        ratios = (step or FULL).ratios(allocation.ratios) if allocation else {}
        return cls(admm_lib.prunable_weights(model), ratios, cfg["prune"], name, cfg[cls.section], allocation)

    def parameters(self, model):
        """What the stage's optimizer trains: ``model``'s parameters (the weights), or param groups
        (dicts with ``params`` and an optional ``lr_scale`` on the section's lr schedule)."""
        return model.parameters()

    def network(self, model):
        """The module the loop trains, attacks and evaluates during the stage: ``model`` itself, or
        a view of it (a score stage's masked network). Checkpoints always save ``model``."""
        return model

    def begin(self, masks):
        return masks

    def finish(self, masks=None):
        """After the last epoch; what it changes is in the stage's final checkpoint (``masks``, the
        held {name: bool mask}, may be changed in place)."""

    window = None  # (epochs before this stage, epochs of all) with lr_span: run (make_stage)

    def lr_clock(self, passes, epochs):
        """(position, length) of the learning-rate schedule after ``passes`` of ``epochs``: of the
        stage's own schedule, or, with ``lr_span: run``, of the one schedule over every stage
        after pretraining (``window``)."""
        if self.window:
            return self.window[0] + passes, self.window[1]
        return passes, epochs

    def update(self, passes, masks):
        """The update after ``passes`` (a Fraction); ``masks`` ({name: bool tensor}, held after
        every optimizer step) may be changed in place. Returns named figures."""
        return {}

    def describe_update(self, figures):
        """One log line's text for the figures ``update`` returned."""
        return " ".join(f"{k}={v}" for k, v in figures.items())

    def largest_residual(self):
        """The log row's ``resid`` column: the largest per-layer residual of the last update."""
        return max(self.figures.get("residual", {}).values(), default=float("nan"))

    def state_dict(self):
        return None

    def load_state_dict(self, state, device):
        pass

    def __repr__(self):
        return f", {self.pcfg['sparsity_type']} pruning of {len(self.ratios)} layers" if self.prunes else ""


class Pretrain(Stage):
    kind = section = "pretrain"
    prunes = False


class ADMMStage(Stage):
    kind = section = "admm"

    def __init__(self, weights, ratios, pcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, pcfg, name, scfg, allocation)
        self.update_every, self.admm = pcfg["update_every"], None

    def begin(self, masks):
        if self.pcfg["masked_progressive"]:  # already-zero weights of the pruned layers stay zero
            masks = {**masks, **admm_lib.nonzero_masks(self.weights, self.ratios)}
        sparsity = admm_lib.Sparsity(self.pcfg["sparsity_type"], self.ratios)
        self.admm = admm_lib.ADMM(self.weights, sparsity, self.pcfg["rho"])
        return masks

    def penalty(self):
        return self.admm.penalty(self.weights)

    def lr_clock(self, passes, epochs):
        if self.pcfg["restart_lr"]:  # the original code restarts the ADMM lr at every Z/U interval
            return passes % self.update_every, self.update_every
        return super().lr_clock(passes, epochs)

    def update(self, passes, masks):
        """Z = Pi_S(W + U), U = U + W - Z, rho *= growth (Eq. 7-8). Returns rho and the per-layer
        primal ||W - Z|| / ||W|| and dual rho ||Z - Z_prev|| / ||W|| residuals."""
        res = self.admm.update(self.weights, self.pcfg["rho_growth"], self.pcfg["rescale_dual"])
        sums = [m.sum().float().view(1) for m in masks.values()]
        if dist.launched() and not dist.same_on_all_ranks(torch.cat([self.admm.fingerprint(), *sums])):
            # Z, U, rho and masks are computed on every rank, not communicated: check that they agree.
            raise RuntimeError("ADMM state differs between ranks; this is a bug, please report it")
        if dist.launched():
            LOG.info(f"   ADMM state identical on {dist.world()} ranks")
        self.figures = {"rho": next(iter(self.admm.rho.values())), "residual": res, "dual_residual": self.admm.dual}
        return self.figures

    def describe_update(self, fig):
        return (f"rho={fig['rho']:.4g} ||W-Z||/||W||: " + " ".join(f"{k}={v:.4f}" for k, v in fig["residual"].items())
                + "  dual rho||dZ||/||W||: " + " ".join(f"{v:.4f}" for v in fig["dual_residual"].values()))

    def state_dict(self):
        return self.admm.state_dict()

    def load_state_dict(self, state, device):
        self.admm = admm_lib.ADMM.from_state_dict(state, device)


class Gradual(Stage):
    """Gradual magnitude pruning (Zhu & Gupta 2017, Eq. 1, from s_i = 0): every
    ``prune.update_every`` passes the smallest weights are pruned to the ratio
    s_t = s_f (1 - (1 - t / T)^3) of each layer's target s_f, t passes into a stage of T, and stay
    pruned (the masks only grow). The baseline ADMM is compared with: no penalty, no Z or U.
    Trains with the ``admm`` section's settings, so both pruning stages get the same budget."""
    kind, section = "gradual", "admm"

    def __init__(self, weights, ratios, pcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, pcfg, name, scfg, allocation)
        self.update_every = pcfg["update_every"]

    def begin(self, masks):
        ones = {n: torch.ones_like(self.weights[n], dtype=torch.bool) for n in self.ratios}
        return {**ones, **masks}  # a mask for every pruned layer, so the optimizer hook holds them all

    @torch.no_grad()
    def update(self, passes, masks):
        f = 1 - (1 - min(float(passes) / max(self.epochs, 1), 1.0)) ** 3
        pruned, energy = admm_lib.hard_prune_measured(self.weights, {n: r * f for n, r in self.ratios.items()},
                                                      self.pcfg["sparsity_type"])
        for n, m in pruned.items():
            masks[n] &= m
        self.figures = {"fraction": f, "pruned_energy": energy}
        return self.figures

    def describe_update(self, fig):
        return (f"magnitude pruning to {fig['fraction']:.3f} of the target, pruned energy: "
                + " ".join(f"{k}={v:.4f}" for k, v in fig["pruned_energy"].items()))

    def largest_residual(self):
        return max(self.figures.get("pruned_energy", {}).values(), default=float("nan"))


class Retrain(Stage):
    kind = section = "retrain"

    def begin(self, masks):
        # Hard pruning: W = Pi_S(W); the kept set is then frozen by the masks, together with the
        # masks of earlier pruning (a weight pruned before stays pruned).
        pruned, energy = admm_lib.hard_prune_measured(self.weights, self.ratios, self.pcfg["sparsity_type"])
        self.figures = {"pruned_energy": energy}
        LOG.info("   hard prune: pruned energy 1 - ||Pi_S(W)||^2/||W||^2: "
                 + " ".join(f"{k}={v:.4f}" for k, v in self.figures["pruned_energy"].items()))
        held = dict(masks)  # a layer this stage does not prune keeps the mask it came with
        for n, m in pruned.items():
            held[n] = m & held[n] if n in held else m
        return held


class Quantize(ADMMStage):
    """ADMM quantization after pruning (Leng et al., AAAI 2018; Ye, Feng et al., arXiv:1903.09769):
    the ADMM stage's training and Z/U updates with Z = Q(W + U), the projection of each layer
    in ``bits`` ({name: b}) onto its levels (``quant.quantize``), the pruned weights held at zero
    by the masks; settings from the ``quant`` section (rho, rho_growth, update_every, ...), the
    budget from the ``quantize`` section. At the end, hard quantization: W = Q(W), every weight
    on its level, and the masks kept. Nothing trains after it: the weights stay fixed on their
    levels (retraining the biases alone, as the issue allows, is not implemented). The epoch rows
    (and the checkpoint's test accuracies) are measured before the hard quantization; the final
    report of a full run, after it.

    ``quantize.epochs: 0`` is the round-to-nearest baseline (post-training quantization of the
    pruned model, no ADMM): no epoch runs, so ``finish`` projects the pruned weights with the same
    projection (levels, scale and masks as ADMM's Z-step) and nothing else changes."""
    kind = section = "quantize"
    settings = "quant"
    prunes = False

    def __init__(self, weights, bits, qcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, {}, qcfg, name, scfg, allocation)
        self.bits = dict(bits)

    @classmethod
    def build(cls, model, cfg, name, step=None, allocation=None):
        bits = quant.resolve_bits(model, cfg["quant"]["bits"])
        return cls(admm_lib.prunable_weights(model), bits, cfg["quant"], name, cfg[cls.section], allocation)

    def begin(self, masks):
        self.admm = admm_lib.ADMM(self.weights, quant.Quantization(self.bits, masks), self.pcfg["rho"])
        return masks

    def load_state_dict(self, state, device):
        self.admm = admm_lib.ADMM.from_state_dict(state, device, quant.Quantization)

    def finish(self, masks=None):
        scales, energy = quant.hard_quantize(self.weights, self.admm.projection)
        self.figures = {**self.figures, "scale": scales, "quantized_energy": energy}
        LOG.info("   hard quantization: " + "  ".join(
            f"{n}: {self.bits[n]} bits, {quant.distinct_nonzero(self.weights[n])} values, "
            f"q={scales[n]:.4g}, energy moved {energy[n]:.4f}" for n in self.bits))

    def __repr__(self):
        return ", quantization of " + ", ".join(f"{n} to {b} bits" for n, b in self.bits.items())


class Hydra(Stage):
    """HYDRA (Sehwag et al., NeurIPS 2020): the weights stay fixed; one score per weight of each
    pruned layer is trained under the adversarial loss, the network using W * top-k(|s|) with the
    exact count of the layer's ratio and a straight-through gradient to the scores (``scores.py``).
    Scores start at HYDRA's scaled magnitude. The conv / linear weights and biases are frozen;
    other parameters (BatchNorm's) train as HYDRA's code trains them. The optimizer, epochs and
    lr schedule are the ``admm`` section's (the same budget as ADMM); the scores' peak lr is
    ``prune.score_lr`` (0: ``admm.lr``). At the end the top-k masks are applied (W = W * m) and
    held from then on: masked fine-tuning is the ``retrain`` stage.

    Every pass over the data, ``update`` logs the share of each layer's mask that changed since
    the last one (``flipped``): it falls towards 0 as the scores settle. The forward's masks are
    cached per version of the scores, so the attack's forwards do not sort again."""
    kind, section = "hydra", "admm"
    update_every = 1

    def __init__(self, weights, ratios, pcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, pcfg, name, scfg, allocation)
        self.scores = {n: nn.Parameter(scores_lib.scaled_scores(weights[n])) for n in self.ratios}
        self.allowed, self.previous, self._cache, self._frozen, self._final = {}, {}, {}, [], {}

    # ----------------------------------------------------------------- what it trains
    def learned(self):
        """The tensors the stage learns (HYDRA: the scores), in a fixed order."""
        return list(self.scores.values())

    def parameters(self, model):
        self._frozen = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]
        frozen = {id(p) for p in self._frozen}
        rest = [p for p in model.parameters() if id(p) not in frozen]
        scale = (self.pcfg["score_lr"] or self.scfg["lr"]) / self.scfg["lr"]
        return ([{"params": rest}] if rest else []) + [{"params": self.learned(), "lr_scale": scale}]

    def network(self, model):
        for p in self._frozen:  # no weight gradients: cheaper, and DDP expects none
            p.requires_grad_(False)
        return scores_lib.MaskedNetwork(model, self)

    # ----------------------------------------------------------------- the masked forward
    def keep(self, n):
        """Weights layer ``n`` keeps now (HYDRA: the exact count of its ratio)."""
        return self.weights[n].numel() - admm_lib.n_pruned(self.weights[n].numel(), self.ratios[n])

    def rate(self, n):
        """Layer ``n``'s differentiable keep rate (HARP), or None."""
        return None

    def version(self, n):
        """Changes whenever what layer ``n``'s mask depends on changes (in-place updates count)."""
        return self.scores[n]._version

    def mask(self, n):
        """Layer ``n``'s current float mask, recomputed only when its scores (or rate) changed: the
        attack's forwards between two optimizer steps reuse it."""
        key = self.version(n)
        if self._cache.get(n, (None,))[0] != key:
            self._cache[n] = (key, scores_lib.top_k_mask(self.scores[n], self.keep(n), self.allowed.get(n)))
        return self._cache[n][1]

    def weight_in_use(self, n):
        """W * m of layer ``n``, differentiable in its scores (and rate) by straight-through."""
        return scores_lib.ScoredWeight.apply(self.weights[n], self.scores[n], self.rate(n), self.mask(n))

    # ----------------------------------------------------------------- hooks
    def begin(self, masks):
        # Weights an earlier stage pruned stay pruned: they are never selected.
        self.allowed = {n: masks[n] for n in self.scores if n in masks}
        with torch.no_grad():
            for n, s in self.scores.items():
                s.copy_(scores_lib.scaled_scores(self.weights[n]))
        self.previous = {n: self.mask(n).bool() for n in self.scores}
        return masks

    @torch.no_grad()
    def update(self, passes, masks):
        """Figures of the pass: per layer, the share of the mask that flipped since the last one."""
        now = {n: self.mask(n).bool() for n in self.scores}
        flipped = {n: (now[n] ^ self.previous[n]).float().mean().item() for n in now}
        self.previous = now
        self.figures = {"flipped": flipped}
        return self.figures

    def describe_update(self, fig):
        return "mask flipped since the last pass: " + " ".join(f"{k}={v:.4f}" for k, v in fig["flipped"].items())

    def largest_residual(self):
        """The log row's ``resid`` column: the largest share of a layer's mask that flipped."""
        return max(self.figures.get("flipped", {}).values(), default=float("nan"))

    @torch.no_grad()
    def finish(self, masks=None):
        """W = W * m with the final top-k masks, which are held from now on; the weights train again."""
        for n in self.scores:
            m = scores_lib.top_k_mask(self.scores[n], self.final_keep(n), self.allowed.get(n)).bool()
            self.weights[n].mul_(m)
            if masks is not None:
                masks[n] = m & masks[n] if n in masks else m
        for p in self._frozen:
            p.requires_grad_(True)

    def final_keep(self, n):
        return self.keep(n)

    def state_dict(self):
        return {"scores": {n: s.detach().cpu() for n, s in self.scores.items()},
                "allowed": {n: m.cpu() for n, m in self.allowed.items()},
                "previous": {n: m.cpu() for n, m in self.previous.items()}}

    def load_state_dict(self, state, device):
        with torch.no_grad():
            for n, s in self.scores.items():
                s.copy_(state["scores"][n])
        self.allowed = {n: m.to(device) for n, m in state["allowed"].items()}
        self.previous = {n: m.to(device) for n, m in state["previous"].items()}

    def __repr__(self):
        return f", HYDRA scores for {len(self.scores)} layers (weights frozen)"


class HARP(Hydra):
    """HARP (Zhao & Wressnegger, ICLR 2023): HYDRA's scores plus one learned keep rate per layer,

        k_l = k_min + (1 - k_min) sigmoid(a_l),   k_min = 0.1 k   (k: the overall keep target),

    layer l keeping round(k_l n_l) weights by its scores, and the rate loss added to the
    adversarial loss (the stage's ``penalty``):

        gamma * max(sum_l n_l k_l / sum_l n_l / k - 1, 0).

    gamma = (e + 1) gamma_0 in pass e, frozen from the first pass after which the rate loss is 0
    (HARP's code: rounded to 4 decimals). a_l starts at the rates of the allocation times
    ``prune.rate_start`` (HARP's code starts from a uniform strategy denser than the target);
    its peak lr is ``prune.rate_lr`` (0: the section's lr). Layers ``prune.prune_ratios`` fixes
    keep their count and enter the sum as constants. At the end the learned rates are rounded to
    counts that meet the overall target exactly (largest remainder, ``allocation.apportion``):
    the new allocation, saved in the checkpoint for retraining, eval and export."""
    kind = "harp"

    def __init__(self, weights, ratios, pcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, pcfg, name, scfg, allocation)
        self.sizes = {n: w.numel() for n, w in weights.items() if n in self.ratios}
        self.learning = [n for n in self.ratios if n not in (allocation.fixed if allocation else ())]
        kept = {n: self.sizes[n] - admm_lib.n_pruned(self.sizes[n], r) for n, r in self.ratios.items()}
        self.target_keep = sum(kept.values()) / sum(self.sizes.values())  # k
        self.k_min = 0.1 * self.target_keep
        self.fixed_keep = {n: kept[n] for n in self.ratios if n not in self.learning}
        self.start = {n: kept[n] / self.sizes[n] for n in self.learning}
        self.a = {n: nn.Parameter(torch.zeros((), device=weights[n].device)) for n in self.learning}
        self.gamma, self.frozen = pcfg["rate_gamma"], False

    def learned(self):
        return list(self.scores.values()) + list(self.a.values())

    def parameters(self, model):
        groups = super().parameters(model)
        groups[-1]["params"] = list(self.scores.values())
        return groups + [{"params": list(self.a.values()), "lr_scale": (self.pcfg["rate_lr"] or self.scfg["lr"]) / self.scfg["lr"]}]

    def k(self, n):
        """Layer ``n``'s keep rate k_l (a differentiable 0-dim tensor)."""
        return self.k_min + (1 - self.k_min) * torch.sigmoid(self.a[n])

    def rate(self, n):
        return self.k(n) if n in self.a else None

    def version(self, n):
        return self.scores[n]._version, self.a[n]._version if n in self.a else -1

    def keep(self, n):
        if n not in self.a:
            return self.fixed_keep[n]
        return min(self.sizes[n], max(1, round(float(self.k(n).detach()) * self.sizes[n])))

    def keep_rate(self):
        """sum_l n_l k_l / sum_l n_l, differentiable in the a_l."""
        kept = sum(self.sizes[n] * self.k(n) for n in self.a) + sum(self.fixed_keep.values())
        return kept / sum(self.sizes.values())

    def penalty(self):
        return self.gamma * torch.clamp(self.keep_rate() / self.target_keep - 1, min=0)

    def begin(self, masks):
        with torch.no_grad():
            for n, a in self.a.items():  # invert k_l for the start rate, inside sigmoid's range
                u = (min(1.0, self.start[n] * self.pcfg["rate_start"]) - self.k_min) / (1 - self.k_min)
                u = min(max(u, 1e-2), 1 - 1e-2)
                a.fill_(math.log(u / (1 - u)))
        self.gamma, self.frozen = self.pcfg["rate_gamma"], False
        return super().begin(masks)

    @torch.no_grad()
    def update(self, passes, masks):
        """Flipped mask shares, then HARP's gamma: frozen once the rate loss is 0, else (e + 1) gamma_0."""
        fig = super().update(passes, masks)
        rate = float(self.keep_rate().detach())
        loss = max(rate / self.target_keep - 1, 0.0)
        if not self.frozen:
            self.frozen = round(loss, 4) == 0
            if not self.frozen:
                self.gamma = (int(passes) + 1) * self.pcfg["rate_gamma"]
        self.figures = {**fig, "keep_rate": rate, "target_keep": self.target_keep, "rate_loss": loss,
                        "gamma": self.gamma, "gamma_frozen": self.frozen,
                        "keep": {n: float(self.k(n).detach()) for n in self.a}}
        return self.figures

    def describe_update(self, fig):
        return (f"keep rate {fig['keep_rate']:.5f} (target {fig['target_keep']:.5f}), rate loss {fig['rate_loss']:.4f}, "
                f"gamma {fig['gamma']:.4g}{' (frozen)' if fig['gamma_frozen'] else ''}; k_l: "
                + " ".join(f"{k}={v:.4f}" for k, v in fig["keep"].items()) + "; " + super().describe_update(fig))

    def final_counts(self):
        """Kept weights per learning layer: the learned n_l k_l, apportioned to meet the target exactly."""
        if not self.a:
            return {}
        total = round(self.target_keep * sum(self.sizes.values())) - sum(self.fixed_keep.values())
        return allocation_lib.apportion({n: self.sizes[n] * float(self.k(n).detach()) for n in self.a},
                                        {n: self.sizes[n] for n in self.a}, total)

    def final_keep(self, n):
        return self._final.get(n, self.keep(n))

    def finish(self, masks=None):
        self._final = self.final_counts()
        ratios = {**{n: admm_lib.n_pruned(self.sizes[n], r) / self.sizes[n] for n, r in self.ratios.items()},
                  **{n: (self.sizes[n] - c) / self.sizes[n] for n, c in self._final.items()}}
        a = self.allocation
        self.allocation = allocation_lib.Allocation(ratios, "harp", a.target if a else 0.0, a.fixed if a else (),
                                                    a.key if a else None)
        self.figures = {**self.figures, "learned_keep": {n: c / self.sizes[n] for n, c in self._final.items()}}
        LOG.info("\n".join(["   HARP's learned rates, rounded to meet the target exactly:"]
                           + self.allocation.lines(self.weights)))
        super().finish(masks)

    def state_dict(self):
        return {**super().state_dict(), "a": {n: a.detach().cpu() for n, a in self.a.items()},
                "gamma": self.gamma, "gamma_frozen": self.frozen}

    def load_state_dict(self, state, device):
        super().load_state_dict(state, device)
        with torch.no_grad():
            for n, a in self.a.items():
                a.copy_(state["a"][n])
        self.gamma, self.frozen = state["gamma"], state["gamma_frozen"]

    def __repr__(self):
        return (f", HARP scores and keep rates for {len(self.scores)} layers (weights frozen), "
                f"keep target {self.target_keep:.5f}")


STAGES = {s.kind: s for s in (Pretrain, ADMMStage, Gradual, Hydra, HARP, Retrain, Quantize)}


class TargetFraction:
    """A progressive round (``prune.rounds``) that prunes each layer to ``fraction`` of its ratio."""

    def __init__(self, fraction):
        self.fraction = fraction

    def ratios(self, ratios):
        return {n: r * self.fraction for n, r in ratios.items()}


FULL = TargetFraction(1.0)


class RateStep:
    """A progressive round at an overall compression rate (``prune.rate_rounds``, arXiv:1903.09769:
    e.g. 10x, 30x, 100x): every layer's kept fraction is the final one times ``final / rate``
    (at most 1), so the layers step up together and the overall rate is ``rate``, except where
    a layer is held dense. The last round (``rate == final``) is the allocation itself."""

    def __init__(self, rate, final):
        self.rate, self.final = rate, final

    def ratios(self, ratios):
        return {n: 1 - min(1.0, (1 - r) * self.final / self.rate) for n, r in ratios.items()}


def pipeline(rounds=(), method="admm", quantize=False, rate_rounds=()):
    """The stages of a full run as [(name, kind, round)]: pretrain, then the pruning stage of
    ``method`` (admm, gradual magnitude pruning, hydra or harp) and retrain; ``oneshot`` prunes
    by magnitude at retrain's start, with no stage before it. ``round`` scales each layer's
    final ratio to the round's (``TargetFraction`` or ``RateStep``).
    With progressive ADMM (Ye, Feng et al., arXiv:1903.09769)
    ``rounds`` lists the fractions, e.g. [0.8, 0.9, 1.0], or ``rate_rounds`` the overall
    compression rates, e.g. [10, 30, 100]: each round runs ADMM to its ratios and
    then masked retraining, from the previous round's pruned model, whose pruned weights stay
    zero (their masks are kept). Earlier rounds are named ``admm.r1``, ``retrain.r1``, ...; the
    last round's are ``admm`` and ``retrain``, so the pruned model is ``retrain.pt`` either way.
    With ``quantize``, a ``quantize`` stage follows the last ``retrain``; its ``quantize.pt`` is
    then the final model (the last step's)."""
    steps_of = ([RateStep(r, rate_rounds[-1]) for r in rate_rounds] if rate_rounds
                else [TargetFraction(f) for f in rounds] or [FULL])
    steps = [("pretrain", "pretrain", FULL)]
    for k, step in enumerate(steps_of, 1):
        tag = "" if k == len(steps_of) else f".r{k}"
        steps += [] if method == "oneshot" else [(f"{method}{tag}", method, step)]
        steps += [(f"retrain{tag}", "retrain", step)]
    return steps + ([("quantize", "quantize", FULL)] if quantize else [])


def _steps(cfg):
    p = cfg["prune"]
    return pipeline(p["rounds"], p["method"], bool(cfg["quant"]["bits"]), p["rate_rounds"])


def stage_names(cfg):
    """The names of a full run's stages under ``cfg``, in order; the last one's checkpoint is the
    final model."""
    return [step[0] for step in _steps(cfg)]


def make_stage(name, model, cfg, ckpt=None, source=None, load=None):
    """(index in the pipeline, the stage object) of pipeline step ``name`` for ``model``: its
    class by kind, built from ``cfg`` (``Stage.build``) for its round, with the run's allocation
    (``allocation.resolve``: ``ckpt``'s, the checkpoint the stage starts or resumes from, read
    from ``source``, or computed now from ``model``'s weights; none for pretraining)."""
    index, (_, kind, step) = next((i, s) for i, s in enumerate(_steps(cfg)) if s[0] == name)
    alloc = None if kind == "pretrain" else allocation_lib.resolve(model, cfg, ckpt, source, load)
    stage = STAGES[kind].build(model, cfg, name, step, alloc)
    if cfg["lr_span"] == "run" and kind != "pretrain":
        stage.window = lr_window(cfg, index)
    return index, stage


def lr_window(cfg, index):
    """(epochs of the stages after pretraining that come before step ``index``, epochs of all of
    them): where step ``index``'s lr schedule starts in ``lr_span: run``'s one schedule."""
    epochs = [cfg[STAGES[kind].section]["epochs"] for _, kind, _ in _steps(cfg)[1:]]
    return sum(epochs[:index - 1]), sum(epochs)
