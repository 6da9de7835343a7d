"""Channel removal: the compact model of a pruned one, with pruned channels removed for real.

**Channel groups.** The channels of a feature map are removed together from the layers that write
it (``producers``: a conv or linear layer with its BN) and from the layers that read it
(``consumers``). Each model declares its groups next to its layers (``models.Group``,
``channel_groups()`` in ``models/<arch>.py``); a model without them is evaluated but not exported.

Channel ``c`` of a group is removed when

- every producer's filter ``c`` is zero (filter pruning). The channel then no longer depends on
  the input, but it is **not zero**: it carries a constant, the BN shift (or the conv bias) after
  ReLU, and in ResNet the sum of those along the stream. Dropping it would change the outputs
  (Torch-Pruning does, see docs/export.md), so its contribution is folded into each consumer: into the
  bias of a linear layer, and for a convolution into ``FoldedConv2d.const_kernel``, the
  convolution of an all-ones map, which is exact at the zero-padded borders too;
- or every consumer's input channel ``c`` is zero in all its columns (column pruning): nobody
  reads the channel, so its producers stop computing it. A channel read by some consumers of a
  group but not others is kept: the map has one width for all of its readers.

The compact model is the model's own class with each changed conv / BN / linear replaced by a
smaller one under the same name (``fit_to_state``), so parameter names stay the real ones and the
export needs no pickled modules: its state dict's shapes say how to rebuild it.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn


def has_channel_groups(model):
    """Whether ``model`` declares its channel groups, which compact export needs."""
    return callable(getattr(model, "channel_groups", None))


def channel_groups(model):
    """The ``models.Group``s that ``model`` declares (``model.channel_groups()``)."""
    if not has_channel_groups(model):
        raise ValueError(f"no channel groups known for {type(model).__name__}: "
                         f"its class declares no channel_groups() (see models/__init__.py)")
    return model.channel_groups()


def keep_channels(state, group, keep):
    """Cut ``state`` (a state dict, changed in place) down to the channels ``keep`` (index tensor)
    of ``group``: rows of its producers (filters, biases, folded kernels, BN channels), channels of its consumer-side
    BNs, columns of its consumers (per channel a block of in_features / n columns: kh*kw, or H*W after a flatten)."""
    n = state[f"{group.producers[0][0]}.weight"].shape[0]
    for layer, bn in group.producers:
        keys = [f"{layer}.{s}" for s in ("weight", "bias", "const_kernel")]
        keys += [f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")] if bn else []
        for k in keys:
            if k in state:
                state[k] = state[k].index_select(0, keep).contiguous()
    for bn in group.consumer_bns:
        for k in (f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")):
            state[k] = state[k].index_select(0, keep).contiguous()
    for layer in group.consumers:
        w = state[f"{layer}.weight"]
        per = w.shape[1] // n
        state[f"{layer}.weight"] = (w.reshape(w.shape[0], n, per, *w.shape[2:]).index_select(1, keep)
                                    .reshape(w.shape[0], len(keep) * per, *w.shape[2:]).contiguous())


@torch.no_grad()
def plan_removal(model, groups):
    """{group name: (kept channels, removed channels whose constant must be folded)}, index tensors.

    Removed: every producer's filter is zero ("silent"), or every consumer's columns of the channel
    are zero ("unread"). Silent channels that are also unread contribute nothing: no fold.
    """
    mods = dict(model.named_modules())
    plans = {}
    for g in groups:
        n = mods[g.producers[0][0]].weight.shape[0]
        silent = torch.ones(n, dtype=torch.bool)
        for layer, _ in g.producers:
            w = mods[layer].weight.detach()
            if w.shape[0] != n:
                raise ValueError(f"group {g.name}: {layer} has {w.shape[0]} output channels, expected {n}")
            silent &= ~(w.reshape(n, -1) != 0).any(1).cpu()
        unread = torch.ones(n, dtype=torch.bool)
        for layer in g.consumers:
            w = mods[layer].weight.detach()
            if w.shape[1] % n:
                raise ValueError(f"group {g.name}: {layer} has {w.shape[1]} inputs, not a multiple of {n} channels")
            unread &= ~(w.reshape(w.shape[0], n, -1) != 0).any(2).any(0).cpu()
        keep = ~(silent | unread)
        if not keep.any():
            keep[0] = True  # a layer keeps at least one channel (zero-width layers are not supported)
        plans[g.name] = (keep.nonzero().flatten(), (silent & ~unread & ~keep).nonzero().flatten())
    return plans


@torch.no_grad()
def _removed_constants(model, groups, plans, input_shape):
    """{consumer: (group width, channels, values)}: the constant each silent removed channel carries at the
    consumer's input, read from one forward of ``model`` (eval mode) on a zero and a random image.
    Both images must give the same value at every position, else the grouping is wrong."""
    mods = dict(model.named_modules())
    seen, hooks = {}, []
    for g in groups:
        if len(plans[g.name][1]):
            for c in g.consumers:
                hooks.append(mods[c].register_forward_pre_hook(lambda m, args, c=c: seen.__setitem__(c, args[0])))
    if not hooks:
        return {}
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.stack([torch.zeros(input_shape), torch.rand(input_shape, generator=torch.Generator().manual_seed(0))])
        model(x.to(p))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for g in groups:
        fold = plans[g.name][1]
        if not len(fold):
            continue
        n = mods[g.producers[0][0]].weight.shape[0]
        for c in g.consumers:
            v = seen[c].detach().reshape(2, n, -1)[:, fold.to(seen[c].device)].cpu()
            if not (v == v[:1, :, :1]).all():
                raise RuntimeError(f"internal error: removed channels of {g.name} are not constant at the input of {c}")
            out[c] = (n, fold, v[0, :, 0])
    return out


class FoldedConv2d(nn.Conv2d):
    """A Conv2d that also adds the contribution of removed input channels that carried constants
    v_c: ``const_kernel`` [out, 1, kh, kw] = sum_c v_c * W[:, c], convolved with an all-ones map
    of the input's size with this layer's stride and zero padding. This equals the removed
    channels' share of the original convolution exactly, borders included, at any input size,
    for one extra single-channel convolution per batch (not per image)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("const_kernel", torch.zeros(self.out_channels, 1, *self.kernel_size))

    def forward(self, x):
        ones = x.new_ones(1, 1, *x.shape[2:])
        # In place: the convolution's output is not needed by its backward, and a new tensor costs more
        # than the single-channel convolution itself on small layers.
        share = F.conv2d(ones, self.const_kernel, None, self.stride, self.padding, self.dilation)
        return super().forward(x).add_(share)


@torch.no_grad()
def compact_state(model, input_shape):
    """(state dict of the compact model, {group name: [kept, total] channels}) for the pruned
    ``model`` (masks applied, any device) on inputs of ``input_shape`` ([C, H, W]). CPU tensors."""
    groups = channel_groups(model)
    plans = plan_removal(model, groups)
    consts = _removed_constants(model, groups, plans, input_shape)
    mods = dict(model.named_modules())
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    # Folds first, from the full weights: the removed channels' share of each consumer.
    for layer, (n, fold, vals) in consts.items():
        w, mod = sd[f"{layer}.weight"], mods[layer]
        share = torch.einsum("ofk,f->ok", w.reshape(w.shape[0], n, -1)[:, fold].double(), vals.double())
        if isinstance(mod, nn.Linear):  # after the flatten every column of a channel sees its constant
            sd[f"{layer}.bias"] = (sd[f"{layer}.bias"].double() + share.sum(1)).to(w.dtype)
        elif share.any():
            if mod.groups != 1 or mod.padding_mode != "zeros":
                raise ValueError(f"{layer}: folding needs groups=1 and zero padding")
            sd[f"{layer}.const_kernel"] = share.reshape(w.shape[0], 1, *w.shape[2:]).to(w.dtype)

    kept = {}
    for g in groups:
        keep = plans[g.name][0]
        n = sd[f"{g.producers[0][0]}.weight"].shape[0]
        kept[g.name] = [len(keep), n]
        if len(keep) < n:
            keep_channels(sd, g, keep)
    return sd, kept


def fit_to_state(model, state):
    """Replace, in place and under the same name, every conv / BN / linear of ``model`` whose
    tensors in ``state`` have other shapes (or that carries a ``const_kernel``) by one of those
    shapes with the same kernel, stride, padding and bias setting. Returns ``model``."""
    for name, mod in list(model.named_modules()):
        shape = state.get(f"{name}.weight", torch.empty(0)).shape
        new = None
        if isinstance(mod, nn.Conv2d) and len(shape) == 4:
            folded = f"{name}.const_kernel" in state
            if shape != mod.weight.shape or folded != isinstance(mod, FoldedConv2d):
                new = (FoldedConv2d if folded else nn.Conv2d)(
                    shape[1] * mod.groups, shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    mod.groups, mod.bias is not None, mod.padding_mode)
        elif isinstance(mod, nn.BatchNorm2d) and len(shape) == 1 and shape != mod.weight.shape:
            new = nn.BatchNorm2d(shape[0], mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        elif isinstance(mod, nn.Linear) and len(shape) == 2 and shape != mod.weight.shape:
            new = nn.Linear(shape[1], shape[0], bias=mod.bias is not None)
        if new is not None:
            parent, _, child = name.rpartition(".")
            # A new module starts in training mode: a BN would then use batch statistics (and overwrite its own).
            setattr(model.get_submodule(parent), child, new.to(mod.weight.device).train(mod.training))
    return model


def compact_model(model, input_shape, state=None):
    """The compact copy of the pruned ``model``: same outputs in eval mode, fewer channels.
    ``state``: its state dict if already computed by ``compact_state``."""
    state = compact_state(model, input_shape)[0] if state is None else state
    out = fit_to_state(copy.deepcopy(model), state)
    out.load_state_dict(state)
    return out

