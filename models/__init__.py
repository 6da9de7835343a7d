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
from models import base, lenet, resnet, vgg  # noqa: F401 - importing an architecture registers it
from models.base import Group, Normalize, available, register  # noqa: F401 - the package's names


def build_model(arch, width, num_classes=10, in_channels=1, image_size=28, mean=(0.0,), std=(1.0,)):
    if arch not in base.REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; choose one of {available()}")
    if isinstance(width, bool) or not (isinstance(width, int) and width >= 1):
        raise ValueError(f"model.width must be a positive integer, got {width!r}")
    return base.REGISTRY[arch](width=width, num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size, normalize=Normalize(mean, std))


def model_from_config(cfg, info, device):
    """The model ``cfg["model"]`` names, for the dataset ``info`` (``data.DatasetInfo``), on ``device``."""
    m = cfg["model"]
    return build_model(m["arch"], m["width"], info.num_classes, info.in_channels, info.image_size,
                       info.mean, info.std).to(device)


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
