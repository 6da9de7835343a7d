"""LeNet of Ye et al. (ICCV 2019): conv5x5 2w -> pool -> conv5x5 4w -> pool -> fc 64w -> fc classes.

w=16 gives the Madry et al. MNIST network (32 and 64 filters, 1024 hidden units).
Input: [N, C, 28, 28] in [0, 1] (any H, W divisible by 4 works).
"""
import torch.nn.functional as F
from torch import nn

from models.base import Group, register


@register("lenet")
class LeNet(nn.Module):
    def __init__(self, width=16, num_classes=10, in_channels=1, image_size=28, normalize=None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, 2 * width, 5, padding=2)
        self.conv2 = nn.Conv2d(2 * width, 4 * width, 5, padding=2)
        self.fc1 = nn.Linear(4 * width * (image_size // 4) ** 2, 64 * width)
        self.fc2 = nn.Linear(64 * width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def channel_groups(self):
        """Each layer's outputs are read by the next layer only; fc1 reads conv2's channel c as
        the (image_size // 4) ** 2 columns that ``flatten(1)`` puts in block c."""
        return [Group("conv1", [("conv1", None)], ["conv2"]), Group("conv2", [("conv2", None)], ["fc1"]),
                Group("fc1", [("fc1", None)], ["fc2"])]
