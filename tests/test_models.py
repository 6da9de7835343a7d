"""Unit tests for the model registry: output shapes, paper widths, real parameter names."""
import pytest
import torch
from torch import nn

import admm
import models
from models import build_model

INPUT = {"lenet": (1, 28), "vgg16": (3, 32), "resnet18": (3, 32)}  # (channels, image size)
CASES = [(a, w) for a in ("lenet", "vgg16", "resnet18") for w in (1, 2, 4)] + [("lenet", 16)]


def build(arch, width):
    c, s = INPUT[arch]
    return build_model(arch, width, in_channels=c, image_size=s)


def test_registry_lists_the_archs():
    assert models.available() == ["lenet", "resnet18", "vgg16", "wrn", "wrn34"]


@pytest.mark.parametrize("arch,width", CASES)
def test_output_shape(arch, width):
    model = build(arch, width).eval()
    c, s = INPUT[arch]
    with torch.no_grad():
        out = model(torch.rand(3, c, s, s))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_num_classes_respected():
    assert build_model("lenet", 1, num_classes=7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_lenet_w16_is_madry_mnist_net():
    m = build("lenet", 16)
    assert m.conv1.out_channels == 32 and m.conv1.kernel_size == (5, 5)
    assert m.conv2.in_channels == 32 and m.conv2.out_channels == 64
    assert m.fc1.in_features == 64 * 7 * 7 and m.fc1.out_features == 1024
    assert m.fc2.in_features == 1024 and m.fc2.out_features == 10


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_cifar_nets_w16_are_standard_width(arch):
    m = build(arch, 16)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs[0].out_channels == 64
    assert max(c.out_channels for c in convs) == 512


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_cifar_nets_scale_linearly_with_width(arch):
    c4 = [mod.out_channels for mod in build(arch, 4).modules() if isinstance(mod, nn.Conv2d)]
    c8 = [mod.out_channels for mod in build(arch, 8).modules() if isinstance(mod, nn.Conv2d)]
    assert c8 == [2 * c for c in c4]


def test_unknown_arch_raises_naming_available():
    with pytest.raises(ValueError) as e:
        build_model("alexnet", 4)
    assert "alexnet" in str(e.value)
    assert all(a in str(e.value) for a in models.available())


@pytest.mark.parametrize("width", [0, -1, 2.5, "4"])
def test_bad_width_raises(width):
    with pytest.raises(ValueError, match="width"):
        build_model("lenet", width)


def test_normalization_inside_model():
    m = build_model("lenet", 1, mean=(0.5,), std=(0.25,))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m.normalize(x), (x - 0.5) / 0.25)
    assert "normalize.mean" in dict(m.named_buffers())


# --------------------------------------------------------------------------- real names

def expected_prunable(model):
    return {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("arch,names,count", [
    ("lenet", ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"], 4),
    ("vgg16", ["features.0.weight", "features.3.weight", "classifier.weight"], 13 + 1),
    ("resnet18", ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
                  "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight", "linear.weight"], 1 + 16 + 3 + 1),
])
def test_prunable_weights_use_real_parameter_names(arch, names, count):
    model = build(arch, 1)
    params = dict(model.named_parameters())
    pw = admm.prunable_weights(model)
    assert len(pw) == count
    assert set(pw) == expected_prunable(model)
    assert set(names) <= set(pw)
    for n, w in pw.items():
        assert params[n] is w          # the model's own parameter, under its own name
        assert w.dim() in (2, 4)       # no BatchNorm or bias vectors
    # Every >=2-D parameter (conv and linear weights) is prunable; nothing else is.
    assert set(pw) == {n for n, p in params.items() if p.dim() >= 2}
    # No wrapper prefixes in the state dict.
    assert not any(k.startswith(("module.", "model.")) for k in model.state_dict())
