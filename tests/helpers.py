"""Helpers shared by several test files."""
import torch.nn.functional as F
import torch

import data
from models import build_model


def train_lenet(split, epochs, batch_size, width=2, lr=3e-3):
    """A LeNet of ``width`` trained naturally with Adam on ``split`` (seeded by the caller), in eval mode."""
    model = build_model("lenet", width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for x, y in data.batches(split, batch_size, "cpu", shuffle=True, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()
