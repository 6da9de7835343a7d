"""WideResNet: RobustBench's state dicts load with no key map, and WRN-28-10
trains a step, prunes filters and exports compact. Expected values come from RobustBench's own
class (when installed) and from counts of nonzero filters made here."""
import importlib.util
import os

import pytest
import torch

import admm
import config
from deploy import channels
from deploy import formats
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def robustbench_wide_resnet():
    """RobustBench's WideResNet class, read from its file: the package's __init__ imports timm and
    more, which the test environment need not have (``pip install --no-deps robustbench``)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        pytest.skip("robustbench is not installed (pip install --no-deps robustbench)")
    path = os.path.join(spec.submodule_search_locations[0], "model_zoo", "architectures", "wide_resnet.py")
    module_spec = importlib.util.spec_from_file_location("rb_wide_resnet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.WideResNet


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                              (m.bias, -0.5, 0.5)):
                t.data.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


def test_a_robustbench_state_dict_loads_with_no_key_map(tmp_path):
    WideResNet = robustbench_wide_resnet()
    torch.manual_seed(0)
    theirs = randomize_bn(WideResNet(depth=28, widen_factor=2, sub_block1=True)).eval()
    path = tmp_path / "Carmon2019Unlabeled.pt"  # as RobustBench ships it: under state_dict, DataParallel's prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    cfg = config.load_config(os.path.join(ROOT, "configs/cifar10.yaml"),
                             ["model.arch=wrn", "model.width=2", "data.mean=[0,0,0]", "data.std=[1,1,1]"])
    model, _, meta = formats.load_model(str(path), cfg=cfg)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=0, atol=1e-5)
    assert meta["format"] == "outside"


@pytest.fixture(scope="module")
def wrn28_10():
    torch.manual_seed(0)
    return randomize_bn(build_model("wrn", 10, 10, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)))


def test_wrn28_10_has_the_published_size(wrn28_10):
    # WRN-28-10: 36.5 M parameters (Zagoruyko & Komodakis 2016, Table 1, "36.5M").
    assert round(sum(p.numel() for p in wrn28_10.parameters()) / 1e6, 1) == 36.5


def test_wrn28_10_trains_a_step(wrn28_10):
    model = wrn28_10.train()
    before = model.block2.layer[0].conv1.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.block2.layer[0].conv1.weight)
    model.eval()


def test_wrn28_10_prunes_filters_and_exports_compact(wrn28_10):
    model = wrn28_10.eval()
    with torch.no_grad():  # half the filters of every conv (filter pruning's projection), by the L2 rule
        for name, w in admm.prunable_weights(model).items():
            if w.dim() == 4:
                w.copy_(admm.project(w, 0.5, "filter"))
    compact = channels.compact_model(model, (3, 32, 32)).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model(x), compact(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # A block's inner channels (conv1 -> bn2 -> conv2): the filters of conv1 left nonzero, counted here.
    for block in (model.block1.layer[0], model.block3.layer[3]):
        name = next(n for n, m in model.named_modules() if m is block)
        nonzero = int((block.conv1.weight.flatten(1).abs().sum(1) > 0).sum())
        assert compact.get_submodule(name).conv1.out_channels == nonzero == block.conv1.out_channels // 2
        assert compact.get_submodule(name).bn2.num_features == nonzero
    assert sum(p.numel() for p in compact.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
