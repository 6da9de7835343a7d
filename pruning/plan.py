"""The plan of a run: its stages in order (pretrain, the pruning stage of ``prune.method``, retrain,
the progressive rounds, quantize), each built from the config by kind, and where each stage's lr
schedule starts under ``lr_span: run``."""
from pruning import allocation as allocation_lib
from pruning.learned import HARP, Hydra
from pruning.stages import ADMMStage, Gradual, Pretrain, Quantize, Retrain


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
