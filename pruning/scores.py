"""Learned masks: one importance score per weight, the network seen through the top-k of the
scores, and the gradients that train them (HYDRA, Sehwag et al. NeurIPS 2020; HARP, Zhao &
Wressnegger ICLR 2023). ``stages.Hydra`` and ``stages.HARP`` use these; nothing here holds a model.

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
