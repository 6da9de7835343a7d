"""Data-parallel training with the standard engine: ``torch.distributed`` launched by ``torchrun``
(or SLURM through torchrun). Outside torchrun everything here is a no-op for one process.

    torchrun --nproc_per_node=4 adv_main.py --config configs/cifar10.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 adv_main.py ...

Backend: NCCL when the run uses CUDA, gloo on CPU.
"""
import os

import torch
import torch.distributed as dist


def launched():
    """True inside a torchrun launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device):
    """Join the process group (torchrun's env:// rendezvous) and return this process's device:
    ``cuda:LOCAL_RANK`` for CUDA runs, the given device otherwise."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def all_sum(t):
    """In-place sum of ``t`` over ranks (no-op for one process); returns ``t``."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def same_on_all_ranks(t):
    """True if the float tensor ``t`` is bit-identical on every rank (compares min and max)."""
    if not dist.is_initialized():
        return True
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
