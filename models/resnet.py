"""ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant as in kuangliu/pytorch-cifar).
Stage widths are 4w, 8w, 16w, 32w, so w=16 is the standard 64-128-256-512 ResNet-18.
Input: [N, 3, 32, 32] in [0, 1]."""
import torch.nn.functional as F
from torch import nn

from models.base import Group, register


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register("resnet18")
class ResNet18(nn.Module):
    def __init__(self, width=16, num_classes=10, in_channels=3, image_size=32, normalize=None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        c = [max(1, 4 * width * m) for m in (1, 2, 4, 8)]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.layer1 = self._make_layer(c[0], c[0], 1)
        self.layer2 = self._make_layer(c[0], c[1], 2)
        self.layer3 = self._make_layer(c[1], c[2], 2)
        self.layer4 = self._make_layer(c[2], c[3], 2)
        self.linear = nn.Linear(c[3], num_classes)

    @staticmethod
    def _make_layer(cin, cout, stride):
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    def channel_groups(self):
        """The blocks of a stage add into one residual stream: the stem (or the stage's projection
        shortcut) and every block's conv2 write the same channels, and every block's conv1, the
        next stage's conv1 and shortcut (or the final linear) read them. A block's inner channels
        (conv1 -> conv2) are a group of their own. Order: each block's inner group, then a stream
        when the next stage's shortcut closes it."""
        groups, stream = [], Group("conv1 + layer1 stream", [("conv1", "bn1")])
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(self, stage)):
                b = f"{stage}.{i}"
                groups.append(Group(f"{b}.conv1", [(f"{b}.conv1", f"{b}.bn1")], [f"{b}.conv2"]))
                stream.consumers.append(f"{b}.conv1")
                if len(block.shortcut):  # a projection shortcut reads the old stream and starts a new one
                    stream.consumers.append(f"{b}.shortcut.0")
                    groups.append(stream)
                    stream = Group(f"{stage} stream", [(f"{b}.shortcut.0", f"{b}.shortcut.1")])
                # conv2's output is added to the stream channel for channel (identity or projection).
                stream.producers.append((f"{b}.conv2", f"{b}.bn2"))
        stream.consumers.append("linear")
        return groups + [stream]
