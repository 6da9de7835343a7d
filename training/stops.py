"""Stopping a run: on a signal (SIGINT / SIGTERM), at the end of the step or attack iteration
it falls in, with the state saved first (``GracefulStop``); and the test hook that sends a
signal at a known step (``SelfSignal``)."""
import os
import signal

import torch

from training import distributed as dist
from common import LOG


class Interrupted(Exception):
    """Raised after SIGINT/SIGTERM once the run's state is saved; carries the exit message."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


STOP_CHECK_EVERY = 20


class AttackStopped(Exception):
    """A stop request that came while a training attack ran (``GracefulStop.guard``)."""


class GracefulStop:
    """While active, SIGINT/SIGTERM only set ``signum``; the training loop then saves a last
    checkpoint at the next step (every ``STOP_CHECK_EVERY`` steps under torchrun, where the ranks
    agree on it) and stops. A request that comes while a guarded training attack runs ends the
    attack within its current iteration (``AttackStopped``), however many steps it was given; the
    loop then saves the state from before that step. A second signal stops at once (the last
    saved state stays valid: saves are atomic)."""

    def __init__(self, device):
        self.signum, self.device = None, device  # the all-reduce runs on the device (NCCL needs CUDA tensors)
        self.in_attack = False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.in_attack:
            LOG.warning(f"got {signal.Signals(signum).name}: stopping the training attack and saving the state "
                        f"from before this step (send again to stop now)")
            raise AttackStopped
        LOG.warning(f"got {signal.Signals(signum).name}: saving at the next step (send again to stop now)")

    def guard(self, attack):
        """``attack`` (called as ``attack(model, x, y)``) made stoppable within one of its
        iterations: an attack never changes the weights, so the state from before the step is
        intact when it is cut short. Single process only: under torchrun the ranks agree on a stop
        at the end of a step."""
        return attack if attack is None or dist.launched() else _Stoppable(attack, self)


    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def requested(self, step=None):
        """Whether to stop after ``step`` (0-based; None: at an epoch's end). Under torchrun the
        ranks agree on it through an all-reduce every STOP_CHECK_EVERY steps."""
        if not dist.launched():
            return self.signum is not None
        if step is not None and (step + 1) % STOP_CHECK_EVERY:
            return False
        return dist.all_sum(torch.tensor([float(self.signum or 0)], device=self.device)).item() > 0


class _Stoppable:
    """An attack during which a stop request raises ``AttackStopped`` (``GracefulStop.guard``)."""

    def __init__(self, attack, stop):
        self.attack, self.stop = attack, stop

    def __call__(self, model, x, y):
        self.stop.in_attack = True
        try:
            if self.stop.signum is not None:  # a request that came just before the attack
                raise AttackStopped
            return self.attack(model, x, y)
        finally:
            self.stop.in_attack = False

    def __getattr__(self, name):
        return getattr(self.__dict__["attack"], name)

    def __repr__(self):
        return repr(self.attack)


def torch_rng():
    """torch's RNG states (CPU and CUDA), which an attack's random start draws from: taken at
    each step's start so a step cut short can be undone (``set_torch_rng``)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def set_torch_rng(state):
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])

class SelfSignal:
    """Test-only, and read in this one place: with ``ADMM_AT_TEST_SIGNAL=<stage>:<n>:<SIGNAME>``
    in the environment (e.g. ``admm:3:SIGKILL``) the run sends itself SIGNAME after the n-th
    minibatch of stage ``<stage>``, counted from the stage's start (1-based), before that step's
    stop check and save. Tests stop (SIGTERM), kill (SIGKILL) or pause (SIGSTOP) a run at a known
    step this way instead of racing a timer. Unset, as in every real run, it does nothing."""

    def __init__(self, spec):
        self.at = None
        if spec:
            stage, n, name = spec.rsplit(":", 2)
            self.at = (stage, int(n), signal.Signals[name])

    def after(self, stage, n):
        if self.at is not None and self.at[:2] == (stage, n):
            os.kill(os.getpid(), self.at[2])


SELF_SIGNAL = SelfSignal(os.environ.get("ADMM_AT_TEST_SIGNAL"))
