"""ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant as in kuangliu/pytorch-cifar).
Stage widths are 4w, 8w, 16w, 32w, so w=16 is the standard 64-128-256-512 ResNet-18.
Input: [N, 3, 32, 32] in [0, 1]."""
import torch.nn.functional as F
from torch import nn

from models import register


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
