"""VGG-16 with batch norm for 32x32 inputs (CIFAR). Channels scale as w/16 of the standard
64-128-256-512 widths, so w=16 is the usual VGG-16. Input: [N, 3, H, W] in [0, 1], H = W = 32 for CIFAR."""
import torch.nn.functional as F
from torch import nn

from models.base import Group, register

# Standard VGG-16 at w=16; 'M' is a 2x2 max pool.
CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register("vgg16")
class VGG16(nn.Module):
    def __init__(self, width=16, num_classes=10, in_channels=3, image_size=32, normalize=None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        layers, c = [], in_channels
        for v in CFG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, v * width // 16)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        # Global pooling makes the head independent of input size (a no-op on 32x32 inputs).
        return self.classifier(F.adaptive_avg_pool2d(self.features(self.normalize(x)), 1).flatten(1))

    def channel_groups(self):
        """One group per conv, with its BN (``features.i + 1``): read by the next conv, the last
        one (after global pooling, one input per channel) by the classifier."""
        convs = [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        return [Group(c, [(c, f"features.{int(c.split('.')[1]) + 1}")], [nxt])
                for c, nxt in zip(convs, convs[1:] + ["classifier"])]
