"""ADMM weight pruning: projections onto sparsity sets, the ADMM state, masks and sparsity reports.

The formulation follows Ye, Xu et al., *Adversarial Robustness vs. Model Compression, or Both?*
(ICCV 2019), Sec. 3, and Ye, Feng et al., *Progressive DNN Compression* (arXiv:1903.09769):

    min_W  f(W) + sum_i g_i(Z_i)   s.t.  W_i = Z_i,         g_i = indicator of the sparsity set S_i

solved with the scaled augmented Lagrangian (Eq. 5-8 of the ICCV paper; Boyd et al. 2011, Sec. 3.1.1):

    W-step:  min_W f(W) + sum_i rho_i/2 ||W_i - Z_i + U_i||_F^2      (SGD for ``update_every`` epochs)
    Z-step:  Z_i = Pi_{S_i}(W_i + U_i)                                (Euclidean projection)
    U-step:  U_i = U_i + W_i - Z_i

Everything here is plain tensor maths on the weights' own device (on CPU, the threshold selection
uses numpy's ``np.partition`` on the same memory, without a copy).
"""
import fnmatch

import numpy as np
import torch
from torch import nn

SCHEMES = ("irregular", "filter", "column")


# --------------------------------------------------------------------------- projections

def n_pruned(n, ratio):
    """Number of the ``n`` groups a ``ratio`` removes: Python's ``round(ratio * n)`` (half to even)."""
    return int(round(ratio * n))


def group_scores(w, scheme):
    """Score of each prunable group of ``w`` ([out, in, kh, kw] conv or [out, in] linear weight).

    irregular: |w| per element (numel scores); filter: L2 norm of each output channel
    (``out`` scores); column: L2 norm of each input position (in, kh, kw) across all filters
    (``in*kh*kw`` scores). Computed in float32 so low-precision weights rank correctly.
    """
    w2 = w.detach().float().flatten(1) if w.dim() > 1 else w.detach().float().view(1, -1)
    if scheme == "irregular":
        return w2.abs().flatten()
    if scheme == "filter":
        return w2.norm(dim=1)
    if scheme == "column":
        # The sum over filters as a vector-matrix product: on CPU it beats norm(dim=0), whose
        # reduction runs across the memory layout.
        return (torch.ones(w2.shape[0], dtype=w2.dtype, device=w2.device) @ w2.square()).sqrt()
    raise ValueError(f"unknown sparsity type {scheme!r}; choose one of {list(SCHEMES)}")


def _kth_largest(score, k):
    """The k-th largest entry of the 1-D ``score`` (1 <= k <= n), by selection, not sorting.
    On CPU numpy's introselect (``np.partition``, zero-copy on the same memory) is ~10x faster
    than ``torch.kthvalue``; elsewhere the selection stays on the device."""
    n = score.numel()
    if score.device.type == "cpu":
        return torch.as_tensor(np.partition(score.numpy(), n - k)[n - k])
    return torch.kthvalue(score, n - k + 1).values


def keep_largest(score, k):
    """Boolean [n] mask of the ``k`` largest entries of the 1-D ``score``; among equal scores the
    lower index is kept. O(n)."""
    n = score.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=score.device)
    threshold = _kth_largest(score, k)
    keep = score >= threshold
    extra = int(keep.sum()) - k  # > 0 only when several scores tie at the threshold
    if extra > 0:
        ties = (score == threshold).nonzero().flatten()
        keep[ties[len(ties) - extra:]] = False  # drop the highest-index ties: lower indices are kept
    return keep


def _group_mask(w, ratio, scheme):
    """The kept groups as a bool mask that broadcasts against ``w.reshape(rows, -1)``:
    [rows, cols] (irregular), [rows, 1] (filter) or [1, cols] (column)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    score = group_scores(w, scheme)
    n = score.numel()
    keep = keep_largest(score, n - n_pruned(n, ratio))
    rows = w.shape[0] if w.dim() > 1 else 1
    return keep.view({"irregular": (rows, -1), "filter": (rows, 1), "column": (1, -1)}[scheme])


def prune_mask(w, ratio, scheme):
    """Boolean mask (shape of ``w``) keeping exactly ``n - round(ratio*n)`` groups of largest score.

    The Euclidean projection onto "at most k nonzero groups" keeps the k groups of largest
    norm. Ties are broken by position (the lower flat index is kept), so the result is
    deterministic on every device, unlike a percentile threshold, which keeps or drops every
    group tied with the threshold together and misses the target.
    """
    rows = w.shape[0] if w.dim() > 1 else 1
    return _group_mask(w, ratio, scheme).expand(rows, w.numel() // rows).reshape(w.shape)


def project(w, ratio, scheme):
    """Euclidean projection of ``w`` onto the sparsity set: ``w * prune_mask(w, ratio, scheme)``
    (computed by broadcasting, without building the full mask)."""
    rows = w.shape[0] if w.dim() > 1 else 1
    return (w.reshape(rows, -1) * _group_mask(w, ratio, scheme)).view_as(w)


# --------------------------------------------------------------------------- which layers

def prunable_weights(model):
    """{name: weight} of every Conv2d and Linear layer, keyed by the model's own parameter names."""
    return {f"{mod_name}.weight" if mod_name else "weight": mod.weight
            for mod_name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}


def resolve_names(model, table, key):
    """Expand ``table`` ({parameter name or fnmatch pattern such as ``conv*.weight``: value}) to
    {name: value} over the prunable weights.

    Entries apply in the order written; a later entry overrides an earlier one for the names it
    matches. An entry that matches no prunable weight is an error naming the config ``key`` and
    listing the valid names.
    """
    names = list(prunable_weights(model))
    out = {}  # in the order first matched: the order of the log's columns
    for k, value in table.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, k)]
        if not hits:
            raise ValueError(f"{key}: {k!r} matches no prunable weight; valid names: {', '.join(names)}")
        out.update(dict.fromkeys(hits, value))
    return out


def resolve_ratios(model, prune_ratios):
    """``prune.prune_ratios`` as {name: ratio} (see ``resolve_names``), its ratios in [0, 1) as
    ``config`` checks them. Layers with ratio 0 are dropped (nothing to prune)."""
    out = resolve_names(model, prune_ratios, "prune.prune_ratios")
    return {n: float(r) for n, r in out.items() if float(r) > 0}


# --------------------------------------------------------------------------- ADMM state

class Sparsity:
    """The sparsity sets S_i of ADMM's Z-step: layer ``name`` keeps ``n - round(ratios[name] * n)``
    groups of ``scheme`` (irregular | filter | column). ``quant.Quantization`` is the other
    projection; ADMM uses either through ``names`` and ``project`` alone."""

    def __init__(self, scheme, ratios):
        self.scheme, self.ratios = scheme, dict(ratios)

    @property
    def names(self):
        return list(self.ratios)

    def project(self, name, w):
        return project(w, self.ratios[name], self.scheme)

    def state_dict(self):
        return {"ratios": self.ratios, "scheme": self.scheme}  # the keys ADMM states always had

    @classmethod
    def from_state_dict(cls, state, device=None):
        return cls(state["scheme"], state["ratios"])

    def __repr__(self):
        return f"Sparsity({self.scheme!r}, {self.ratios})"


class ADMM:
    """ADMM auxiliary variables Z, scaled duals U and penalties rho, one of each per layer of
    ``projection`` (a ``Sparsity``, or a ``quant.Quantization``), which says onto which set each
    layer's Z is projected. Weights are passed in at each call as {name: tensor}; the object
    never holds the model.
    """

    def __init__(self, weights, projection, rho):
        self.projection = projection
        # Initialise Z = Pi_S(W), U = 0 (ICCV'19 Sec. 3.2).
        self.Z = {n: projection.project(n, weights[n].detach()) for n in projection.names}
        self.U = {n: torch.zeros_like(z) for n, z in self.Z.items()}
        self.rho = {n: float(rho) for n in projection.names}

    def penalty(self, weights):
        """sum_i rho_i/2 * ||W_i - Z_i + U_i||_F^2, differentiable w.r.t. the weights (Eq. 6)."""
        return sum(self.rho[n] / 2 * (weights[n] - self.Z[n] + self.U[n]).pow(2).sum() for n in self.Z)

    @torch.no_grad()
    def update(self, weights, rho_growth=1.0, rescale_dual=True):
        """Z = Pi_S(W + U); U = U + W - Z (Eq. 7-8); then rho *= rho_growth.

        When rho grows the scaled dual is rescaled, U *= rho_old / rho_new, so the unscaled
        multiplier lambda = rho * U is unchanged (Boyd et al. 2011, Sec. 3.4.1). With
        ``rescale_dual=False`` U is kept as it is, as the original authors' code does; the
        multiplier then grows with rho.
        Returns the per-layer primal residuals ``residuals`` measured after the update; the dual
        residuals of this update are left in ``self.dual`` ({name: float}).
        """
        self.dual = {}
        for n in self.projection.names:
            w, z_prev = weights[n].detach(), self.Z[n]
            self.Z[n] = self.projection.project(n, w + self.U[n])
            self.U[n] = self.U[n] + w - self.Z[n]
            # Dual residual rho ||Z_k+1 - Z_k|| (Boyd et al. 2011, Eq. 3.19), relative to ||W|| like the primal one.
            self.dual[n] = (self.rho[n] * (self.Z[n] - z_prev).norm() / w.norm().clamp_min(1e-12)).item()
            self.rho[n] *= rho_growth
            if rescale_dual:
                self.U[n] = self.U[n] / rho_growth
        return self.residuals(weights)

    @torch.no_grad()
    def residuals(self, weights):
        """Per-layer primal residual ||W - Z|| / ||W|| (Boyd et al. 2011, Eq. 3.19, relative to ||W||);
        it falls as W converges to the projection's set."""
        return {n: ((weights[n] - self.Z[n]).norm() / weights[n].norm().clamp_min(1e-12)).item()
                for n in self.Z}

    @torch.no_grad()
    def fingerprint(self):
        """Per-layer sums of Z, |Z|, U and rho: equal on all ranks iff (almost surely) the states are."""
        return torch.cat([torch.stack([self.Z[n].sum(), self.Z[n].abs().sum(), self.U[n].sum(),
                                       torch.tensor(self.rho[n], device=self.Z[n].device)]).float()
                          for n in self.Z])

    def state_dict(self):
        """Z, U, rho and the projection's own keys (a sparsity set's ``ratios`` and ``scheme``:
        so a sparsity set's state reads as it always has)."""
        return {"Z": self.Z, "U": self.U, "rho": self.rho, **self.projection.state_dict()}

    @classmethod
    def from_state_dict(cls, state, device=None, projection=Sparsity):
        """The state saved by ``state_dict``, with its projection rebuilt by ``projection``'s
        ``from_state_dict`` (the caller knows which set it projects to; every state saved before
        quantization is a ``Sparsity``'s)."""
        self = cls.__new__(cls)
        self.projection = projection.from_state_dict(state, device)
        self.rho = dict(state["rho"])
        self.Z = {n: t.to(device) for n, t in state["Z"].items()}
        self.U = {n: t.to(device) for n, t in state["U"].items()}
        return self


# --------------------------------------------------------------------------- masks

def hard_prune(weights, ratios, scheme):
    """Project each weight in place (W = Pi_S(W)) and return the {name: bool mask} it kept."""
    masks = {}
    with torch.no_grad():
        for n, r in ratios.items():
            masks[n] = prune_mask(weights[n], r, scheme)
            weights[n].mul_(masks[n])
    return masks


@torch.no_grad()
def hard_prune_measured(weights, ratios, scheme):
    """``hard_prune``, and the fraction of each layer's squared norm it removed (the "pruned
    energy", 1 - ||Pi_S(W)||^2 / ||W||^2). A converged ADMM stage leaves W almost on the sparse
    set, so the hard prune removes almost nothing. Returns (masks, {name: pruned energy})."""
    before = {n: weights[n].detach().float().square().sum() for n in ratios}
    masks = hard_prune(weights, ratios, scheme)
    return masks, {n: 1.0 - float(weights[n].detach().float().square().sum()) / max(float(e), 1e-30)
                   for n, e in before.items()}


def nonzero_masks(weights, names):
    """Masks of the weights that are currently nonzero (for ``masked_progressive``)."""
    return {n: weights[n].detach() != 0 for n in names}


@torch.no_grad()
def apply_masks(weights, masks):
    for n, m in masks.items():
        weights[n].mul_(m)


def attach_masks(optimizer, weights, masks):
    """Re-apply ``masks`` after every ``optimizer.step()``, so neither momentum nor weight decay
    can revive a pruned weight. Returns the hook handle (``.remove()`` to detach)."""
    apply_masks(weights, masks)
    return optimizer.register_step_post_hook(lambda *_: apply_masks(weights, masks))


# --------------------------------------------------------------------------- reports

@torch.no_grad()
def layer_sparsity(w):
    """{"element", "column", "filter"}: zero fraction of elements, of columns (input positions
    across all filters) and of filters (output channels)."""
    w2 = w.detach().flatten(1) if w.dim() > 1 else w.detach().view(1, -1)
    nz = w2 != 0
    # Integer counts, so the fractions are exact (k / n), not float32 means.
    return {"element": 1.0 - nz.sum().item() / nz.numel(),
            "column": 1.0 - nz.any(dim=0).sum().item() / nz.shape[1],
            "filter": 1.0 - nz.any(dim=1).sum().item() / nz.shape[0]}


def sparsity_report(model, ratios, scheme):
    """Sparsity of every prunable layer (with its target ``ratio``, 0 if not pruned), plus, over
    the pruned layers (ratio > 0): ``overall``, their zero fraction, and ``compression_rate``,
    their total weights / nonzero weights; and over all prunable layers: ``prunable`` {params,
    zeros, fraction} (what an overall ``prune.target`` counts)."""
    layers, total, zeros = [], 0, 0
    for n, w in prunable_weights(model).items():
        nnz = int((w != 0).sum())
        layers.append({"name": n, "shape": list(w.shape), "ratio": ratios.get(n, 0.0), "params": w.numel(),
                       "nonzero": nnz, **layer_sparsity(w)})
        if n in ratios:
            total, zeros = total + w.numel(), zeros + w.numel() - nnz
    every = sum(L["params"] for L in layers)
    every_zeros = sum(L["params"] - L["nonzero"] for L in layers)
    return {"type": scheme, "overall": zeros / total if total else 0.0,
            "compression_rate": total / max(total - zeros, 1) if total else 1.0, "layers": layers,
            "prunable": {"params": every, "zeros": every_zeros, "fraction": every_zeros / max(every, 1)}}
