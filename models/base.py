"""What every architecture shares: the registry it joins with ``@register``, the ``Group`` of
channels it declares for compact export, and the ``Normalize`` layer it starts with."""
from dataclasses import dataclass, field

import torch
from torch import nn

REGISTRY = {}


def register(name):
    def deco(cls):
        REGISTRY[name] = cls
        return cls
    return deco


def available():
    return sorted(REGISTRY)


@dataclass
class Group:
    """The channels of one feature map, kept or removed together: output channels of ``producers``
    ([(conv or linear name, its BN name or None)], several when their outputs are summed into one
    map, as in a ResNet stream) and input channels of ``consumers`` ([conv or linear name]). A
    consumer reads channel c as the c-th of n equal blocks of its inputs: one for a conv, or
    after a flatten the block of H x W columns that ``flatten(1)`` puts there. ``consumer_bns``
    (pre-activation nets) normalize the map on its way to the consumers and lose the same channels."""
    name: str
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    consumer_bns: list = field(default_factory=list)  # BNs that read the map before its consumers
    # (pre-activation: BN -> ReLU -> conv); cut to the kept channels with it


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers so they follow the model's device and dtype."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std
