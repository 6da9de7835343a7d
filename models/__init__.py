"""Model registry: ``build_model(arch, width, num_classes, in_channels, mean, std)``.

Each architecture registers itself by name with ``@register``; nothing here is an if/elif chain.
Width convention (Ye et al. ICCV 2019, Sec. 4): ``width`` is the paper's scaling factor w.
For LeNet the layers are conv 2w -> conv 4w -> fc 64w -> classes, so w=16 is the Madry MNIST
net (32, 64, 1024). For VGG-16 and ResNet-18, w=16 is the standard width (first conv has
64 = 4w channels) and every layer scales linearly with w.

Inputs are images in [0, 1]; each model normalizes internally (``Normalize``), so attack
epsilons stay in pixel units.

A model that can be exported compactly (channels removed, ``deploy/channels.py``) and narrowed by
inherited initialization (``experiments/inherit.py``) declares its ``channel_groups()``: a list
of ``Group``s, written next to its layers because only the model knows which layers share a map.
"""
from common import UserError
from models import base, lenet, resnet, vgg, wrn  # noqa: F401 - importing an architecture registers it
from models.base import Group, Normalize, available, register  # noqa: F401 - the package's names


def build_model(arch, width, num_classes=10, in_channels=1, image_size=28, mean=(0.0,), std=(1.0,)):
    if arch not in base.REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; choose one of {available()}")
    if isinstance(width, bool) or not (isinstance(width, int) and width >= 1):
        raise ValueError(f"model.width must be a positive integer, got {width!r}")
    return base.REGISTRY[arch](width=width, num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size, normalize=Normalize(mean, std))


def model_from_config(cfg, info, device):
    """The model ``cfg["model"]`` names, for the dataset ``info`` (``data.DatasetInfo``), on ``device``.
    Its normalization is ``data.mean`` / ``data.std`` when set, else the dataset's."""
    m = cfg["model"]
    return build_model(m["arch"], m["width"], info.num_classes, info.in_channels, info.image_size,
                       *normalization(cfg, info)).to(device)


def normalization(cfg, info):
    """(mean, std) the model normalizes its [0, 1] inputs with: ``data.mean`` / ``data.std`` when
    set (one value per input channel, std > 0), else the dataset's (``info``)."""
    d = cfg["data"]
    mean, std = tuple(d.get("mean") or info.mean), tuple(d.get("std") or info.std)
    if len(mean) != info.in_channels or len(std) != info.in_channels or not all(s > 0 for s in std):
        raise UserError(f"data.mean and data.std need {info.in_channels} values each (std > 0) for "
                        f"{info.name}, got {list(mean)} and {list(std)}")
    return mean, std


def load_weights(model, ckpt, path, cfg):
    """Load ``ckpt``'s weights into ``model`` after checking it was built for the same model."""
    for key in ("arch", "width"):
        if ckpt.get(key) != cfg["model"][key]:
            raise UserError(f"{path} holds model.{key}={ckpt.get(key)!r} but the config says "
                            f"{cfg['model'][key]!r}; use a matching config or --set model.{key}={ckpt.get(key)}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the model ({str(e).splitlines()[0]}); "
                        f"was it trained on another dataset?") from None
    except Exception as e:  # noqa: BLE001 - not a state dict at all
        raise UserError(f"{path} holds no model weights this project can read ({type(e).__name__})") from None
