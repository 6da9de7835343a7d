"""Datasets as in-memory uint8 tensors, fed by one small batch iterator.

Every dataset here fits in memory (CIFAR-10 train is 150 MB as uint8), so instead of a
per-sample DataLoader the whole set is held as a [N, C, H, W] uint8 tensor and batches are
sliced, moved to the device and scaled to [0, 1] there. CIFAR augmentation (random crop with
4-pixel zero padding + horizontal flip, as in Madry et al. and the paper) runs batched on the
device. Shuffling uses a generator seeded by (seed, epoch), so an epoch's order is reproducible.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from common import UserError

DEMO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_5k.npz")
DEMO_TRAIN_PER_CLASS = 400  # of the 500 digits per class: first 400 train, last 100 test


@dataclass
class Split:
    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor  # [N] int64


@dataclass
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple
    std: tuple
    augment: bool  # random crop + flip during training


INFO = {
    "demo": DatasetInfo("demo", 1, 28, 10, (0.0,), (1.0,), False),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.0,), (1.0,), False),
    "fashion_mnist": DatasetInfo("fashion_mnist", 1, 28, 10, (0.0,), (1.0,), False),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), True),
}


def _demo(cfg):
    """The bundled 5,000 real MNIST digits (sorted by class, 500 per class). Fixed split: per
    class, the first 400 are train and the last 100 test, so 4,000 train / 1,000 test. Each split
    is then put in a fixed random order (seed 0), so that "the first N examples" (train_limit,
    eval limit) covers every class instead of the first classes only."""
    with np.load(DEMO_FILE) as d:
        images, labels = torch.from_numpy(d["images"]).unsqueeze(1), torch.from_numpy(d["labels"]).long()
    train = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        train[(labels == c).nonzero().flatten()[:DEMO_TRAIN_PER_CLASS]] = True
    g = torch.Generator().manual_seed(0)
    splits = []
    for part in (train, ~train):
        idx = part.nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        splits.append(Split(images[idx], labels[idx]))
    return tuple(splits)


def _torchvision(cls_name, folder):
    def load(cfg):
        import torchvision
        cls = getattr(torchvision.datasets, cls_name)
        root = cfg["data"]["root"]
        try:
            sets = [cls(root, train=t, download=cfg["data"]["download"]) for t in (True, False)]
        except Exception as e:  # noqa: BLE001 - missing files and failed downloads raise many types
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            raise UserError(f"{cls_name} not found under {root}/{folder} and could not be downloaded "
                            f"({reason}); put the dataset files in {root}/{folder}/raw/ (or the "
                            f"torchvision layout), or set data.root, or data.download=true with internet access") from None
        out = []
        for ds in sets:
            images = torch.as_tensor(np.asarray(ds.data))
            images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images.unsqueeze(1)
            out.append(Split(images.contiguous(), torch.as_tensor(ds.targets).long()))
        return tuple(out)
    return load


LOADERS = {
    "demo": _demo,
    "mnist": _torchvision("MNIST", "MNIST"),
    "fashion_mnist": _torchvision("FashionMNIST", "FashionMNIST"),
    "cifar10": _torchvision("CIFAR10", "cifar-10-batches-py"),
}


def _synthetic(info, n, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, info.in_channels, info.image_size, info.image_size)
    return Split(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                 torch.randint(0, info.num_classes, (n,), generator=g))


def load_data(cfg):
    """(train Split, test Split, DatasetInfo) for ``cfg["data"]`` (the validation split, if any,
    already held out of train: ``load_splits``)."""
    train, _, test, info = load_splits(cfg)
    return train, test, info


def load_splits(cfg):
    """(train, val, test Split, DatasetInfo) for ``cfg["data"]``. The validation split is the last
    ``data.val_size`` examples of the dataset's training set, held out of it before
    ``data.train_limit`` takes the first N of the rest; so it is disjoint from the training
    examples and, being training-set images, from the test set. ``val_size`` 0 (the default):
    an empty validation split and the training set exactly as before the option."""
    dcfg = cfg["data"]
    info = INFO[dcfg["dataset"]]
    if dcfg["synthetic"]:
        n = (dcfg["train_limit"] or 512) + dcfg.get("val_size", 0)
        train, test = _synthetic(info, n, cfg["seed"]), _synthetic(info, max(n // 4, 64), cfg["seed"] + 1)
    else:
        train, test = LOADERS[dcfg["dataset"]](cfg)
    n_val = dcfg.get("val_size", 0)  # a config saved before the key (an older checkpoint's): none
    if n_val >= len(train.labels):
        raise UserError(f"data.val_size: {n_val} leaves no training examples of the {len(train.labels)} in "
                        f"{dcfg['dataset']}; hold out fewer")
    cut = len(train.labels) - n_val
    val = Split(train.images[cut:], train.labels[cut:])
    train = Split(train.images[:cut], train.labels[:cut])
    if dcfg["train_limit"]:
        train = Split(train.images[: dcfg["train_limit"]], train.labels[: dcfg["train_limit"]])
    return train, val, test, info


def _augment(x, generator):
    """Random crop (4-pixel zero padding) and horizontal flip, per example, batched."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    off = torch.randint(0, 9, (2, n), generator=generator).to(x.device)
    rows = (off[0].view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (off[1].view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    x = padded.gather(2, rows.expand(n, x.shape[1], h, padded.shape[3])).gather(3, cols.expand(n, x.shape[1], h, w))
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def batches(split, batch_size, device, shuffle=False, augment=False, seed=0, epoch=0, limit=0, rank=0, world=1):
    """Yield (x float [B, C, H, W] in [0, 1] on ``device``, y int64 [B]) over ``split``.

    ``limit`` keeps the first N examples (0 = all). With ``shuffle``, the order is a
    ``DistributedSampler``'s for (seed, epoch): this process (``rank`` of ``world``) gets every
    world-th example of one permutation shared by all ranks, so the ranks' i-th batches together
    are the single-process run's i-th batch of size world * batch_size. Without ``shuffle`` the
    first ``limit`` examples are split the same way, without padding (evaluation).
    """
    n = min(limit, len(split.labels)) if limit else len(split.labels)
    if shuffle:
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
    else:
        order = torch.arange(rank, n, world)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)  # augmentation
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = split.images[idx].to(device, non_blocking=True).float().div_(255)
        if augment:
            x = _augment(x, g)
        yield x, split.labels[idx].to(device, non_blocking=True)


def num_batches(split, batch_size, limit=0, world=1):
    n = min(limit, len(split.labels)) if limit else len(split.labels)
    per_rank = (n + world - 1) // world
    return (per_rank + batch_size - 1) // batch_size
