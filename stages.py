"""The three stages as objects with the same hooks; ``engine.train_stage`` runs any of them:

    pretrain  train the dense model
    admm      train with the ADMM penalty rho/2 ||W - Z + U||^2 (ICCV'19 Eq. 6), Z/U updated every
              ``prune.update_every`` passes over the data (Eq. 7-8)
    retrain   hard-prune W onto the sparsity set (W = Pi_S(W)), then train with the masks held fixed

Hooks (all a stage needs to differ; the loop never asks which stage it runs):

    begin(masks)       a fresh start: given the masks inherited from the previous stage, set up
                       this stage's state and return the masks to hold during it
    penalty            None, or a function returning the term added to the loss
    update_every       passes over the data between ``update`` calls (0: never)
    update()           the periodic update; returns named figures for the log and metrics.jsonl
    figures            the stage's convergence figures so far (ADMM: the last update's residuals;
                       retrain: the hard prune's pruned energy), kept in the checkpoint's metrics
    state_dict() / load_state_dict(state, device)   the stage's state in the checkpoint ("admm")
"""
import admm as admm_lib
import distributed as dist
from common import LOG


class Stage:
    """Defaults shared by the stages: no penalty, no update, no state of its own."""
    name = None
    prunes = True  # logged in the stage's header
    update_every = 0
    penalty = None

    def __init__(self, weights, ratios, pcfg):
        """``weights``: {name: parameter} of the prunable layers; ``ratios``: {name: ratio} of the
        pruned ones; ``pcfg``: the config's ``prune`` section."""
        self.weights, self.ratios, self.pcfg = weights, ratios, pcfg
        self.figures = {}

    def begin(self, masks):
        return masks

    def update(self):
        return {}

    def state_dict(self):
        return None

    def load_state_dict(self, state, device):
        pass

    def __repr__(self):
        return f", {self.pcfg['sparsity_type']} pruning of {len(self.ratios)} layers" if self.prunes else ""


class Pretrain(Stage):
    name = "pretrain"
    prunes = False


class ADMMStage(Stage):
    name = "admm"

    def __init__(self, weights, ratios, pcfg):
        super().__init__(weights, ratios, pcfg)
        self.update_every, self.admm = pcfg["update_every"], None

    def begin(self, masks):
        if self.pcfg["masked_progressive"]:  # already-zero weights stay zero (progressive pruning)
            masks = {**masks, **admm_lib.nonzero_masks(self.weights, self.weights)}
        self.admm = admm_lib.ADMM(self.weights, self.ratios, self.pcfg["sparsity_type"], self.pcfg["rho"])
        return masks

    def penalty(self):
        return self.admm.penalty(self.weights)

    def update(self):
        """Z = Pi_S(W + U), U = U + W - Z, rho *= growth (Eq. 7-8). Returns rho and the per-layer
        ||W - Z|| / ||W||."""
        res = self.admm.update(self.weights, self.pcfg["rho_growth"])
        if dist.launched() and not dist.same_on_all_ranks(self.admm.fingerprint()):
            # Z, U and rho are computed on every rank, not communicated: check that they agree.
            raise RuntimeError("ADMM state differs between ranks; this is a bug, please report it")
        if dist.launched():
            LOG.info(f"   ADMM state identical on {dist.world()} ranks")
        self.figures = {"rho": next(iter(self.admm.rho.values())), "residual": res, "dual_residual": self.admm.dual}
        return self.figures

    @staticmethod
    def describe_update(fig):
        return (f"rho={fig['rho']:.4g} ||W-Z||/||W||: " + " ".join(f"{k}={v:.4f}" for k, v in fig["residual"].items())
                + "  dual rho||dZ||/||W||: " + " ".join(f"{v:.4f}" for v in fig["dual_residual"].values()))

    def state_dict(self):
        return self.admm.state_dict()

    def load_state_dict(self, state, device):
        self.admm = admm_lib.ADMM.from_state_dict(state, device)


class Retrain(Stage):
    name = "retrain"

    def begin(self, masks):
        # Hard pruning: W = Pi_S(W); the kept set is then frozen by the masks, together with the
        # masks of earlier pruning (a weight pruned before stays pruned).
        norms = {n: self.weights[n].detach().float().square().sum() for n in self.ratios}
        pruned = admm_lib.hard_prune(self.weights, self.ratios, self.pcfg["sparsity_type"])
        self.figures = {"pruned_energy": admm_lib.pruned_energy(norms, self.weights)}
        LOG.info("   hard prune: pruned energy 1 - ||Pi_S(W)||^2/||W||^2: "
                 + " ".join(f"{k}={v:.4f}" for k, v in self.figures["pruned_energy"].items()))
        return {n: pruned[n] & masks[n] if n in masks else pruned[n] for n in {*masks, *pruned}}


STAGES = {s.name: s for s in (Pretrain, ADMMStage, Retrain)}  # in pipeline order
