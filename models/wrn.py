"""Wide ResNet (Zagoruyko & Komodakis, BMVC 2016), pre-activation, as the CIFAR-10 robustness
literature uses it: TRADES (Zhang et al. 2019), RobustBench's ``WideResNet`` and HYDRA's
``wrn_28_4`` (Sehwag et al. 2020). WRN-d-k has a 16-channel stem and three groups of
n = (d - 4) / 6 blocks of 16k, 32k and 64k channels, the last two starting at stride 2.

Width convention: ``width`` is the paper's widening factor k (WRN-28-10: ``arch: wrn``,
``width: 10``), so that a published WRN-d-k loads at ``width: k``; unlike the other models, w=16
is not "standard" here. ``wrn`` is depth 28, ``wrn34`` depth 34.

The parameter names are RobustBench's (``block1.layer.0.conv1.weight``, ``convShortcut``,
``bn1``, ``fc``), so its state dicts load without a key map (docs/bring_your_own_model.md).
Input: [N, 3, H, W] in [0, 1], normalized inside (``Normalize``); RobustBench's models take
[0, 1] with no normalization: ``data.mean: [0, 0, 0]``, ``data.std: [1, 1, 1]``.
"""
import torch.nn.functional as F
from torch import nn

from models.base import Group, register


class Block(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, added to the input. When the channels
    change, a 1x1 ``convShortcut`` replaces the identity and reads the pre-activated input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class Stage(nn.Module):
    """n blocks; the module ``layer`` only carries the published names (``block1.layer.0``)."""

    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*(Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)))

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    depth = 28

    def __init__(self, width=10, num_classes=10, in_channels=3, image_size=32, normalize=None):
        super().__init__()
        n, c = (self.depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.block1 = Stage(n, c[0], c[1], 1)
        self.block2 = Stage(n, c[1], c[2], 2)
        self.block3 = Stage(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        # Global pooling: RobustBench's avg_pool2d(out, 8) on 32x32 inputs, at any input size.
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1))

    def channel_groups(self):
        """A stage's blocks add into one residual stream, written by the stem (or the stage's first
        ``convShortcut``) and every block's conv2 (no BN after them: pre-activation), and read
        through a BN (``consumer_bns``) by every block's conv1, a ``convShortcut`` and finally
        ``bn1`` -> ``fc``. A block's inner channels (conv1 -> bn2 -> conv2) are a group of their own."""
        groups, stream = [], Group("conv1 stream", [("conv1", None)])
        for stage in ("block1", "block2", "block3"):
            for i, block in enumerate(getattr(self, stage).layer):
                b = f"{stage}.layer.{i}"
                groups.append(Group(f"{b}.conv1", [(f"{b}.conv1", f"{b}.bn2")], [f"{b}.conv2"]))
                stream.consumers.append(f"{b}.conv1")
                stream.consumer_bns.append(f"{b}.bn1")
                if block.convShortcut is not None:  # reads the old stream and starts a new one
                    stream.consumers.append(f"{b}.convShortcut")
                    groups.append(stream)
                    stream = Group(f"{stage} stream", [(f"{b}.convShortcut", None)])
                stream.producers.append((f"{b}.conv2", None))
        stream.consumers.append("fc")
        stream.consumer_bns.append("bn1")
        return groups + [stream]


@register("wrn")
class WRN28(WideResNet):
    depth = 28


@register("wrn34")
class WRN34(WideResNet):
    depth = 34
