"""The stages as objects with the same hooks; ``training.loop.train_stage`` runs any of them:

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
    state_dict() / load_state_dict(state, device)   the stage's state in the checkpoint ("stage_state")
"""

import torch

import admm as admm_lib
from training import distributed as dist
from pruning import quant
from common import LOG


class Stage:
    """Defaults shared by the stages: no penalty, no update, no state of its own. ``kind`` names
    the stage class, ``section`` the config section it trains with (epochs, optimizer, lr),
    ``settings_name`` the one its method's settings come from (rho, ...), and ``name`` its checkpoint
    files (``admm.r1`` for progressive rounds)."""
    kind = section = None
    settings_name = "prune"
    prunes = True  # logged in the stage's header
    update_every = 0
    penalty = None

    def __init__(self, weights, ratios, settings, name=None, scfg=None, allocation=None):
        """``weights``: {name: parameter} of the prunable layers; ``ratios``: {name: ratio} of the
        pruned ones (this round's); ``settings``: the config section ``settings_name`` names; ``name``: default
        ``kind``; ``scfg``: the config section it trains with (its ``epochs``: the passes over the
        data the stage makes); ``allocation``: the run's ``allocation.Allocation`` (its final
        ratios), saved in the stage's checkpoints."""
        self.weights, self.ratios, self.settings, self.name = weights, ratios, settings, name or self.kind
        self.scfg, self.allocation = scfg or {}, allocation
        self.epochs, self.figures = self.scfg.get("epochs", 0), {}

    @classmethod
    def build(cls, model, cfg, name, step=None, allocation=None):
        """The stage ``name`` for ``model`` under ``cfg``: the ``allocation``'s ratios as its
        round ``step`` (a ``TargetFraction`` or ``RateStep``; default the whole target) scales
        them, the ``prune`` settings, its section's settings."""
        ratios = (step.ratios(allocation.ratios) if step else allocation.ratios) if allocation else {}
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

    def largest_gap(self):
        """How far the stage is from settling at its last update, the largest over layers: the log
        row's ``gap`` column and the ``stage_gap`` metric. ADMM: the primal residual ||W - Z|| / ||W||;
        gradual: the pruned energy of the latest prune; HYDRA, HARP: the share of a mask that flipped."""
        return max(self.figures.get("residual", {}).values(), default=float("nan"))

    def state_dict(self):
        return None

    def load_state_dict(self, state, device):
        pass

    def __repr__(self):
        return f", {self.settings['sparsity_type']} pruning of {len(self.ratios)} layers" if self.prunes else ""


class Pretrain(Stage):
    kind = section = "pretrain"
    prunes = False


class ADMMStage(Stage):
    kind = section = "admm"

    def __init__(self, weights, ratios, settings, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, settings, name, scfg, allocation)
        self.update_every, self.admm = settings["update_every"], None

    def begin(self, masks):
        if self.settings["masked_progressive"]:  # already-zero weights of the pruned layers stay zero
            masks = {**masks, **admm_lib.nonzero_masks(self.weights, self.ratios)}
        sparsity = admm_lib.Sparsity(self.settings["sparsity_type"], self.ratios)
        self.admm = admm_lib.ADMM(self.weights, sparsity, self.settings["rho"])
        return masks

    def penalty(self):
        return self.admm.penalty(self.weights)

    def lr_clock(self, passes, epochs):
        if self.settings["restart_lr"]:  # the original code restarts the ADMM lr at every Z/U interval
            return passes % self.update_every, self.update_every
        return super().lr_clock(passes, epochs)

    def update(self, passes, masks):
        """Z = Pi_S(W + U), U = U + W - Z, rho *= growth (Eq. 7-8). Returns rho and the per-layer
        primal ||W - Z|| / ||W|| and dual rho ||Z - Z_prev|| / ||W|| residuals."""
        res = self.admm.update(self.weights, self.settings["rho_growth"], self.settings["rescale_dual"])
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

    def __init__(self, weights, ratios, settings, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, settings, name, scfg, allocation)
        self.update_every = settings["update_every"]

    def begin(self, masks):
        ones = {n: torch.ones_like(self.weights[n], dtype=torch.bool) for n in self.ratios}
        return {**ones, **masks}  # a mask for every pruned layer, so the optimizer hook holds them all

    @torch.no_grad()
    def update(self, passes, masks):
        f = 1 - (1 - min(float(passes) / max(self.epochs, 1), 1.0)) ** 3
        pruned, energy = admm_lib.hard_prune_measured(self.weights, {n: r * f for n, r in self.ratios.items()},
                                                      self.settings["sparsity_type"])
        for n, m in pruned.items():
            masks[n] &= m
        self.figures = {"fraction": f, "pruned_energy": energy}
        return self.figures

    def describe_update(self, fig):
        return (f"magnitude pruning to {fig['fraction']:.3f} of the target, pruned energy: "
                + " ".join(f"{k}={v:.4f}" for k, v in fig["pruned_energy"].items()))

    def largest_gap(self):
        return max(self.figures.get("pruned_energy", {}).values(), default=float("nan"))


class Retrain(Stage):
    kind = section = "retrain"

    def begin(self, masks):
        # Hard pruning: W = Pi_S(W); the kept set is then frozen by the masks, together with the
        # masks of earlier pruning (a weight pruned before stays pruned).
        pruned, energy = admm_lib.hard_prune_measured(self.weights, self.ratios, self.settings["sparsity_type"])
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
    levels (retraining the biases alone is not implemented). The epoch rows
    (and the checkpoint's test accuracies) are measured before the hard quantization; the final
    report of a full run, after it.

    ``quantize.epochs: 0`` is the round-to-nearest baseline (post-training quantization of the
    pruned model, no ADMM): no epoch runs, so ``finish`` projects the pruned weights with the same
    projection (levels, scale and masks as ADMM's Z-step) and nothing else changes."""
    kind = section = "quantize"
    settings_name = "quant"
    prunes = False

    def __init__(self, weights, bits, qcfg, name=None, scfg=None, allocation=None):
        super().__init__(weights, {}, qcfg, name, scfg, allocation)
        self.bits = dict(bits)

    @classmethod
    def build(cls, model, cfg, name, step=None, allocation=None):
        bits = quant.resolve_bits(model, cfg["quant"]["bits"])
        return cls(admm_lib.prunable_weights(model), bits, cfg["quant"], name, cfg[cls.section], allocation)

    def begin(self, masks):
        self.admm = admm_lib.ADMM(self.weights, quant.Quantization(self.bits, masks), self.settings["rho"])
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
