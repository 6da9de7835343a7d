"""Weights from outside this project, read as one of its checkpoints: a plain state dict (a ``.pt``
read with ``weights_only``, or a ``.safetensors`` file), nested under ``state_dict``, ``model`` or
``net`` and with DataParallel's ``module.`` prefixes, as RobustBench, HYDRA and HARP ship them;
and HYDRA's and HARP's ``popup_scores`` folded into plain weights and masks.

``as_checkpoint`` gives the dict a training checkpoint of this project holds (``model``,
``config``, ``arch``, ``width``, ``masks``, ``allocation``), so ``eval.py``, ``export.py`` and
``--init`` read it as they read their own. The config comes from the user (``--config``,
``--set``): a state dict does not say which architecture it is. Layouts, key maps and the input
convention: docs/bring_your_own_model.md.
"""
import torch

from common import LOG, UserError

NESTED = ("state_dict", "model", "net")  # where a training script may have put the state dict
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
# Keys that no architecture here computes with: TRADES/HYDRA's WideResNet builds a ``sub_block1``
# that its forward never calls (RobustBench's builds it only with sub_block1=True).
IGNORED = ("sub_block1.",)


def find_state_dict(obj, path):
    """The {name: tensor} in ``obj``: ``obj`` itself, or the first of ``NESTED`` that holds one
    (searched two levels deep), with ``module.`` / ``_orig_mod.`` prefixes removed."""
    for _ in range(3):
        if _is_state_dict(obj):
            return {_strip(k): v for k, v in obj.items() if not _strip(k).startswith(IGNORED)}
        inner = next((obj[k] for k in NESTED if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"{path} is neither a checkpoint nor an export of this project, and holds no state dict "
                    f"(name -> tensor) at its top or under {', '.join(NESTED)}; it has: {keys}")


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(key):
    for p in PREFIXES:
        while key.startswith(p):
            key = key[len(p):]
    return key


def refuse_nonfinite(state, path):
    """A ``UserError`` naming the first tensor of ``state`` with NaN or inf, and its count: a model
    with such a weight or buffer computes nothing meaningful."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise UserError(f"{path}: {name} holds {bad} NaN or inf value{'s' * (bad > 1)} of {t.numel()}; "
                                f"a model with non-finite weights is no model: use an earlier checkpoint")


# --------------------------------------------------------------------------- HYDRA and HARP

def subnet_masks(state, path, subnet):
    """(state with ``weight * mask`` and no score entries, {weight name: bool mask}) of a state dict
    holding HYDRA's or HARP's ``popup_scores``; ``subnet``: the config's ``subnet`` section.

    Both keep, in each layer, the weights whose |score| is not among the j = int((1 - k) n)
    smallest (``GetSubnet`` of hidden-networks, Ramanujan et al. 2020, which HYDRA, Sehwag et al.
    2020, and HARP, Zhao et al. 2023, use). HYDRA's k is one number given by the user (its --k).
    HARP learns k per layer: k = sigmoid(k_score) (1 - k_min) + k_min with k_min = k * alpha
    (its ``rate_act_func``; k and alpha its --k and --alpha), computed in float32 as it does."""
    scores = [n for n in state if n.endswith(".popup_scores")]
    harp = any(n.endswith(".k_score") for n in state)
    if not subnet["k"]:
        who = "HARP (k_score)" if harp else "HYDRA"
        raise UserError(f"{path} is a {who} checkpoint: its masks need {'its' if not harp else 'the target'} k, "
                        f"which the file does not store; give it as --set subnet.k=K (the --k it was pruned with)")
    out, masks = {n: t for n, t in state.items() if not n.endswith((".popup_scores", ".k_score"))}, {}
    for name in scores:
        layer = name[:-len(".popup_scores")]
        w, s = state.get(f"{layer}.weight"), state[name]
        if w is None or s.shape != w.shape:
            raise UserError(f"{path}: {name} has shape {list(s.shape)}, not its weight's "
                            f"{None if w is None else list(w.shape)}; only weight (unstructured) scores are read")
        k = _harp_rate(state, layer, subnet, path) if harp else subnet["k"]
        masks[f"{layer}.weight"] = mask = top_scores(s, k)
        out[f"{layer}.weight"] = w * mask
    return out, masks


def _harp_rate(state, layer, subnet, path):
    k_score = state.get(f"{layer}.k_score")
    if k_score is None or k_score.numel() != 1:
        raise UserError(f"{path}: {layer} has popup_scores but no one-number k_score, as HARP writes it")
    k_min = subnet["k"] * subnet["alpha"]
    return torch.sigmoid(k_score.float().reshape(())) * (1 - k_min) + k_min


def top_scores(scores, k):
    """Bool mask keeping all but the j = int((1 - k) n) smallest |scores| (ties: the earlier
    position counts as smaller). ``k``: a float or HARP's float32 0-dim tensor."""
    n = scores.numel()
    j = int((1 - k) * n)
    order = scores.detach().abs().flatten().sort(stable=True).indices
    mask = torch.ones(n, dtype=torch.bool)
    mask[order[:j]] = False
    return mask.view_as(scores)


# --------------------------------------------------------------------------- into a model

def fit(model, state, path):
    """Load ``state`` into ``model``. A mismatch is one line naming the first missing, unexpected
    and wrong-shaped keys with their counts. ``normalize.*`` buffers may be missing (the config's
    are kept); present, they win, and a warning says so when they differ from the config's."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("normalize.")]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what} ({v[0]}{', ...' if len(v) > 1 else ''})"
                 for what, v in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", shaped)) if v]
        raise UserError(f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}; check model.arch and "
                        f"model.width (docs/bring_your_own_model.md lists the key maps)")
    for k in ("normalize.mean", "normalize.std"):
        if k in state and k in own and not torch.allclose(state[k].float(), own[k].float()):
            LOG.warning(f"warning: {path} normalizes with {k.split('.')[1]} {state[k].flatten().tolist()}, the "
                        f"config with {own[k].flatten().tolist()}; the file's is used (data.mean / data.std)")
    model.load_state_dict({**own, **state})


def as_checkpoint(obj, path, cfg, model):
    """This project's checkpoint dict for the outside weights ``obj`` (a loaded ``.pt`` or
    ``.safetensors``), fitted to ``model`` (built from ``cfg``, its weights replaced)."""
    state = find_state_dict(obj, path)
    masks = {}
    if any(k.endswith(".popup_scores") for k in state):
        state, masks = subnet_masks(state, path, cfg["subnet"])
    refuse_nonfinite(state, path)
    fit(model, state, path)
    ratios = {n: 1 - int(m.sum()) / m.numel() for n, m in masks.items()}
    return {"model": model.state_dict(), "config": cfg, "arch": cfg["model"]["arch"], "width": cfg["model"]["width"],
            "masks": masks, "stage": "outside", "adversarial": None,
            "allocation": {"ratios": ratios} if ratios else None}


def describe_masks(masks):
    """One line: kept weights of the folded masks, overall and per layer."""
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    return (f"scores folded into masks: {kept:,} of {total:,} weights kept ({kept / max(total, 1):.2%}), "
            + ", ".join(f"{n} {int(m.sum())}/{m.numel()}" for n, m in masks.items()))
