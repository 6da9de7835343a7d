"""Learned masks: one importance score per weight, the network seen through the top-k of the
scores, and the gradients that train them (HYDRA, Sehwag et al. NeurIPS 2020; HARP, Zhao &
Wressnegger ICLR 2023), and the two stages that learn them, ``Hydra`` and ``HARP``. The scores and
rates are stage state; nothing here holds a model.

Forward: each pruned layer uses W * m, m = top-k(|s|) (exactly k ones). m is a step function of
the scores, so its gradient is taken straight through (Bengio et al. 2013; HYDRA's GetSubnet):
dL/dm is passed on as if m were |s|, so

    dL/ds = dL/d(W m) * W * sign(s)

and, for HARP, with k = round(k_l n) from a learned keep rate k_l, as if every entry of m moved
with k_l (HARP's GetSubnet: the rate's gradient is the sum of the mask's):

    dL/dk_l = sum_i dL/d(W m)_i * W_i
"""
import math

import torch
from torch import nn

import admm as admm_lib
from common import LOG, UserError
from pruning import allocation as allocation_lib
from pruning.stages import Stage


def scaled_scores(w):
    """HYDRA's initial scores (Sehwag et al. 2020, Sec. 3.3, "scaled initialization"), shape of
    ``w``: s = sqrt(6 / fan_in) * W / max|W|, the magnitude ranking at the scale of Kaiming-uniform
    initialisation (fan_in = in_channels * kh * kw, or in_features)."""
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    return math.sqrt(6 / fan_in) * w.detach() / w.detach().abs().max().clamp_min(1e-12)


def top_k_mask(score, k, allowed=None):
    """Float mask (shape and dtype of ``score``) with ones at the ``k`` largest |score| (ties: the
    lower flat index), never where ``allowed`` (bool, same shape) is False."""
    select = score.detach().abs().flatten()
    if allowed is not None:
        select = torch.where(allowed.flatten(), select, torch.full_like(select, -1.0))
    return admm_lib.keep_largest(select, k).view_as(score).to(score.dtype)


class ScoredWeight(torch.autograd.Function):
    """W * m with the straight-through gradients of the module docstring. Inputs: the weight
    ``w``, its ``score`` (shape of w), the layer's differentiable keep ``rate`` (a 0-dim tensor,
    or None) and the float ``mask`` (shape of w) already computed from them."""

    @staticmethod
    def forward(ctx, w, score, rate, mask):
        ctx.save_for_backward(w, score, mask)
        return w * mask

    @staticmethod
    def backward(ctx, g):
        w, score, mask = ctx.saved_tensors
        g_mask = g * w
        g_w = g * mask if ctx.needs_input_grad[0] else None
        g_score = g_mask * score.sign() if ctx.needs_input_grad[1] else None
        g_rate = g_mask.sum() if ctx.needs_input_grad[2] else None
        return g_w, g_score, g_rate, None


class MaskedNetwork(nn.Module):
    """``model`` seen through a score stage's masks: ``forward(x)`` runs the model with each pruned
    layer's weight replaced by ``stage.weight_in_use(name)`` (``torch.func.functional_call``, so
    the model itself, its parameter names and its state_dict are untouched). The training step,
    the training attack and the per-epoch evaluation all call this module, so the attack sees the
    network the loss sees. It holds the stage's learned tensors as its own parameters, so DDP
    averages their gradients."""

    def __init__(self, model, stage):
        super().__init__()
        self.model, self.stage = model, stage
        self.learned = nn.ParameterList(stage.learned())

    def forward(self, x):
        return torch.func.functional_call(self.model, {n: self.stage.weight_in_use(n) for n in self.stage.scores}, (x,))


class Hydra(Stage):
    """HYDRA (Sehwag et al., NeurIPS 2020): the weights stay fixed; one score per weight of each
    pruned layer is trained under the adversarial loss, the network using W * top-k(|s|) with the
    exact count of the layer's ratio and a straight-through gradient to the scores (below).
    Scores start at HYDRA's scaled magnitude. The conv / linear weights and biases are frozen;
    other parameters (BatchNorm's) train as HYDRA's code trains them. The optimizer, epochs and
    lr schedule are the ``admm`` section's (the same budget as ADMM); the scores' peak lr is
    ``prune.score_lr`` (0: ``admm.lr``). With ``prune.score_optimizer`` (sgd | adam) the scores
    (and HARP's rates) get an optimizer of their own instead, with ``prune.score_momentum`` and
    ``prune.score_weight_decay`` (HYDRA's code: SGD, lr 0.1, momentum 0.9, weight decay 1e-4),
    still on the admm section's schedule; BatchNorm's parameters keep the admm section's. At the end the top-k masks are applied (W = W * m) and
    held from then on: masked fine-tuning is the ``retrain`` stage.

    Every pass over the data, ``update`` logs the share of each layer's mask that changed since
    the last one (``flipped``): it falls towards 0 as the scores settle. The forward's masks are
    cached per version of the scores, so the attack's forwards do not sort again."""
    kind, section = "hydra", "admm"
    update_every = 1

    def __init__(self, weights, ratios, settings, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, settings, name, scfg, allocation)
        self.scores = {n: nn.Parameter(scaled_scores(weights[n])) for n in self.ratios}
        self.allowed, self.previous, self._cache, self._frozen, self._final = {}, {}, {}, [], {}

    # ----------------------------------------------------------------- what it trains
    def learned(self):
        """The tensors the stage learns (HYDRA: the scores), in a fixed order."""
        return list(self.scores.values())

    def parameters(self, model):
        self._frozen = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]
        frozen = {id(p) for p in self._frozen}
        rest = [p for p in model.parameters() if id(p) not in frozen]
        scale = (self.settings["score_lr"] or self.scfg["lr"]) / self.scfg["lr"]
        # "own": stepped by the scores' own optimizer when prune.score_optimizer is set (state.make_optimizer)
        return ([{"params": rest}] if rest else []) + [{"params": self.learned(), "lr_scale": scale, "own": True}]

    def network(self, model):
        for p in self._frozen:  # no weight gradients: cheaper, and DDP expects none
            p.requires_grad_(False)
        return MaskedNetwork(model, self)

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
            self._cache[n] = (key, top_k_mask(self.scores[n], self.keep(n), self.allowed.get(n)))
        return self._cache[n][1]

    def weight_in_use(self, n):
        """W * m of layer ``n``, differentiable in its scores (and rate) by straight-through."""
        return ScoredWeight.apply(self.weights[n], self.scores[n], self.rate(n), self.mask(n))

    # ----------------------------------------------------------------- hooks
    def begin(self, masks):
        # Weights an earlier stage pruned stay pruned: they are never selected.
        self.allowed = {n: masks[n] for n in self.scores if n in masks}
        with torch.no_grad():
            for n, s in self.scores.items():
                s.copy_(scaled_scores(self.weights[n]))
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

    def largest_gap(self):
        """The largest share of a layer's mask that flipped at the last update (``Stage.largest_gap``)."""
        return max(self.figures.get("flipped", {}).values(), default=float("nan"))

    @torch.no_grad()
    def finish(self, masks=None):
        """W = W * m with the final top-k masks, which are held from now on; the weights train again."""
        for n in self.scores:
            m = top_k_mask(self.scores[n], self.final_keep(n), self.allowed.get(n)).bool()
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


def start_logit(k, k_min, clip="floor", name="layer"):
    """a_l such that k_min + (1 - k_min) sigmoid(a_l) is the start keep rate ``k``: logit(u) with
    u = (k - k_min) / (1 - k_min), u clipped first, as ``prune.rate_init_clip`` says:

    floor    u in [0.01, 0.99] (this project's: a start below k_min + 0.01 (1 - k_min) is raised
             to it, e.g. at a 99 % target, k_min = 0.001, every start below 1.1 % kept)
    authors  u in [-0.99, 0.99], HARP's ``utils.rate_init_func`` (intellisec/harp): only the top is
             clipped in effect; u <= 0 (a start at or below k_min) gives log of 0 or of a negative
             there (-inf or NaN), so here it is an error naming the layer."""
    u = (k - k_min) / (1 - k_min)
    if clip == "authors":
        u = min(max(u, -0.99), 0.99)
        if u <= 0:
            raise UserError(f"prune.rate_init_clip=authors: {name} starts at keep rate {k:.5f}, at or below k_min "
                            f"{k_min:.5f}, where HARP's inverse is undefined; raise prune.rate_start or use "
                            f"prune.rate_init_clip=floor")
    else:
        u = min(max(u, 1e-2), 1 - 1e-2)
    return math.log(u / (1 - u))


class HARP(Hydra):
    """HARP (Zhao & Wressnegger, ICLR 2023): HYDRA's scores plus one learned keep rate per layer,

        k_l = k_min + (1 - k_min) sigmoid(a_l),   k_min = 0.1 k   (k: the overall keep target),

    layer l keeping round(k_l n_l) weights by its scores, and the rate loss added to the
    adversarial loss (the stage's ``penalty``):

        gamma * max(sum_l n_l k_l / sum_l n_l / k - 1, 0).

    gamma = (e + 1) gamma_0 in pass e, frozen from the first pass after which the rate loss is 0
    (HARP's code: rounded to 4 decimals). a_l starts at the rates of the allocation times
    ``prune.rate_start`` (HARP's code starts from a uniform strategy denser than the target),
    inverted as ``prune.rate_init_clip`` says (``start_logit``);
    its peak lr is ``prune.rate_lr`` (0: the section's lr). Layers ``prune.prune_ratios`` fixes
    keep their count and enter the sum as constants. At the end the learned rates are rounded to
    counts that meet the overall target exactly (largest remainder, ``allocation.apportion``):
    the new allocation, saved in the checkpoint for retraining, eval and export."""
    kind = "harp"

    def __init__(self, weights, ratios, settings, name=None, scfg=None, allocation=None):
        super().__init__(weights, ratios, settings, name, scfg, allocation)
        self.sizes = {n: w.numel() for n, w in weights.items() if n in self.ratios}
        self.learning = [n for n in self.ratios if n not in (allocation.fixed if allocation else ())]
        kept = {n: self.sizes[n] - admm_lib.n_pruned(self.sizes[n], r) for n, r in self.ratios.items()}
        self.target_keep = sum(kept.values()) / sum(self.sizes.values())  # k
        self.k_min = 0.1 * self.target_keep
        self.fixed_keep = {n: kept[n] for n in self.ratios if n not in self.learning}
        self.start = {n: kept[n] / self.sizes[n] for n in self.learning}
        self.a = {n: nn.Parameter(torch.zeros((), device=weights[n].device)) for n in self.learning}
        self.gamma, self.frozen = settings["rate_gamma"], False

    def learned(self):
        return list(self.scores.values()) + list(self.a.values())

    def parameters(self, model):
        groups = super().parameters(model)
        groups[-1]["params"] = list(self.scores.values())
        return groups + [{"params": list(self.a.values()), "lr_scale": (self.settings["rate_lr"] or self.scfg["lr"]) / self.scfg["lr"],
                          "own": True}]  # HARP's code steps the rates with the scores' optimizer

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
            for n, a in self.a.items():
                a.fill_(start_logit(min(1.0, self.start[n] * self.settings["rate_start"]), self.k_min,
                                    self.settings.get("rate_init_clip", "floor"), n))
        self.gamma, self.frozen = self.settings["rate_gamma"], False
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
                self.gamma = (int(passes) + 1) * self.settings["rate_gamma"]
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
