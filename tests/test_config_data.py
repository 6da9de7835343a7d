"""Unit tests for config.py (one config path, errors that name the key) and data.py (demo data,
batches, CIFAR augmentation)."""
import glob
import os

import pytest
import torch

import config
import data
from common import UserError
from helpers import ROOT


# --------------------------------------------------------------------------- config

def test_defaults_load_and_are_plain():
    cfg = config.load_config(None)
    assert cfg == config.DEFAULTS
    assert cfg is not config.DEFAULTS and cfg["adv"] is not config.DEFAULTS["adv"]  # a copy


@pytest.mark.parametrize("raw,value", [("8/255", 8 / 255), ("0.25", 0.25), ("1/4", 0.25), ("0", 0.0),
                                        ("2e-2", 0.02)])
def test_fraction_and_number_overrides(raw, value):
    assert config.load_config(None, [f"adv.eps={raw}"])["adv"]["eps"] == pytest.approx(value, rel=1e-12)


def test_overrides_win_and_nest():
    cfg = config.load_config(None, ["adv.steps=7", "model.arch=vgg16", "data.download=false",
                                    "pretrain.milestones=[3, 6]", "prune.prune_ratios={conv1.weight: 1/2}"])
    assert cfg["adv"]["steps"] == 7 and cfg["model"]["arch"] == "vgg16"
    assert cfg["data"]["download"] is False and cfg["pretrain"]["milestones"] == [3, 6]
    assert cfg["prune"]["prune_ratios"] == {"conv1.weight": 0.5}
    assert cfg["admm"]["milestones"] == []  # stages do not share the list


@pytest.mark.parametrize("item,key,hint", [
    ("adv.epss=0.1", "adv.epss", "did you mean adv.eps"),
    ("advv.eps=0.1", "advv", "did you mean adv"),
    ("prune.sparsity=filter", "prune.sparsity", "did you mean prune.sparsity_type"),
])
def test_unknown_key_suggests(item, key, hint):
    with pytest.raises(UserError) as e:
        config.load_config(None, [item])
    assert key in str(e.value) and hint in str(e.value)


@pytest.mark.parametrize("item,key", [
    ("adv.steps=ten", "adv.steps"),          # wrong types
    ("adv.steps=2.5", "adv.steps"),
    ("adv.eps=abc", "adv.eps"),
    ("adv.eps=1/0", "adv.eps"),
    ("data.download=3", "data.download"),
    ("model.width=true", "model.width"),
    ("model.arch=3", "model.arch"),
    ("pretrain.milestones=5", "pretrain.milestones"),
    ("prune.prune_ratios=0.5", "prune.prune_ratios"),
    ("adv.eps=-0.1", "adv.eps"),             # out of range
    ("model.width=0", "model.width"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("prune.prune_ratios={fc1.weight: 1.0}", "fc1.weight"),
    ("model.arch=alexnet", "model.arch"),    # bad choices
    ("data.dataset=svhn", "data.dataset"),
    ("prune.sparsity_type=channel", "prune.sparsity_type"),
    ("admm.optimizer=rmsprop", "admm.optimizer"),
    ("retrain.schedule=linear", "retrain.schedule"),
    ("adv.eps", "adv.eps"),                  # not key=value
    ("adv.eps=.nan", "adv.eps"),             # YAML's NaN and infinity: NaN < 0 is false, so they are
    ("pretrain.lr=.inf", "pretrain.lr"),     # refused where a number is read
    ("prune.rho=.nan", "prune.rho"),
    ("quant.rho_growth=.nan", "quant.rho_growth"),
    ("adv.step_size=.inf", "adv.step_size"),
    ("adv.eps=-.inf", "adv.eps"),
    ("adv.eps=1e400", "adv.eps"),             # beyond float range
    ("prune.prune_ratios.fc1.weight=.nan", "fc1.weight"),
])
def test_bad_values_raise_user_error_naming_key(item, key):
    with pytest.raises(UserError) as e:
        config.load_config(None, [item])
    assert key in str(e.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(UserError, match="lenet.*resnet18.*vgg16"):
        config.load_config(None, ["model.arch=alexnet"])
    with pytest.raises(UserError, match="sgd, adam"):
        config.load_config(None, ["pretrain.optimizer=rmsprop"])


def test_yaml_file_errors(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("adv:\n  epz: 0.1\n")
    with pytest.raises(UserError, match="adv.epz"):
        config.load_config(str(bad_key))
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("adv: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load_config(str(bad_yaml))
    with pytest.raises(UserError, match="cannot read"):
        config.load_config(str(tmp_path / "missing.yaml"))
    ok = tmp_path / "c.yaml"
    ok.write_text("adv:\n  eps: 8/255\n")
    assert config.load_config(str(ok), ["adv.eps=0.1"])["adv"]["eps"] == 0.1  # override wins over file
    assert config.load_config(str(ok))["adv"]["eps"] == 8 / 255


@pytest.mark.parametrize("text,match", [
    ("adv:\n  eps: 0.1\nseed: 1\nadv:\n  steps: 3\n", "key 'adv' is given twice, on lines 1 and 4"),
    ("prune:\n  prune_ratios:\n    fc1.weight: 0.5\n    fc1.weight: 0.9\n",
     "key 'fc1.weight' is given twice, on lines 3 and 4"),
    ("adv: {eps: 0.1, eps: 0.2}\n", "key 'eps' is given twice"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- adv\n- seed\n", "must hold a mapping of keys.*not a list"),
    ("3\n", "must hold a mapping of keys.*not a int"),
])
def test_config_files_are_read_strictly(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        config.load_config(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("blob,match", [(b"\xff\xfe\x00a\x00", "not UTF-8 text"), (b"adv:\x00\x01\x02", "binary file"),
                                        (bytes(range(256)), "not UTF-8 text")])
def test_a_binary_config_is_one_line(tmp_path, blob, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(blob)
    with pytest.raises(UserError, match=match):
        config.load_config(str(path))
    with pytest.raises(UserError, match="is a folder"):
        config.load_config(str(tmp_path))


@pytest.mark.parametrize("item,message", [
    ("seed=-1", r"seed: must be in \[0, 2\^32 - 1\], got -1"),
    ("seed=4294967296", "seed: must be in"),
    ("pretrain.gamma=-5", "pretrain.gamma: must be > 0"),
    ("admm.gamma=0", "admm.gamma: must be > 0"),
    ("pretrain.milestones=[-1]", r"pretrain.milestones\[0\]: must be >= 1, got -1"),
    ("retrain.milestones=[2, 0]", r"retrain.milestones\[1\]: must be >= 1, got 0"),
    ("adv.eps=5", r"adv.eps: must be in \[0, 1\], got 5.0"),
    ("adv.step_size=0", "adv.step_size: must be > 0"),
    ("eval.step_size=0", "eval.step_size: must be > 0"),
    ("prune.rho=0", "prune.rho: must be > 0"),
    ("quant.rho=0", "quant.rho: must be > 0"),
    ("prune.rho_growth=0.9", "prune.rho_growth: must be >= 1"),
    ("prune.update_every=0", "prune.update_every: must be >= 1"),
    ("eval.every=0", "eval.every: must be >= 1"),
    ("pretrain.momentum=1", r"pretrain.momentum: must be in \[0, 1\)"),
    ("quant.bits.fc1.weight=17", r"quant.bits.fc1.weight: must be in \[0, 16\]"),
    ("prune.rounds=[0, 1]", r"prune.rounds\[0\]: must be in \(0, 1\]"),
    ("model.width=2000", r"model.width: must be in \[1, 1024\]"),
])
def test_every_range_is_checked_and_named(item, message):
    with pytest.raises(UserError, match=message):
        config.load_config(None, [item])


def test_an_interval_or_milestone_beyond_its_stage_is_a_warning():
    assert config.warnings_of(config.load_config("configs/demo.yaml")) == []
    cfg = config.load_config("configs/demo.yaml", ["prune.update_every=99", "adv.eps_ramp=99"])
    said = config.warnings_of(cfg)
    assert len(said) == 2 and "prune.update_every=99 is more than admm.epochs" in said[1]
    assert "never reaches the full adv.eps" in said[0]
    assert config.warnings_of(config.load_config("configs/demo.yaml", ["prune.update_every=99",
                                                                      "prune.method=oneshot"])) == []
    # a run shortened with --set keeps its milestones: they never fire, and it says so
    said = config.warnings_of(config.load_config("configs/cifar10.yaml", ["pretrain.epochs=1"]))
    assert said[0] == "pretrain.milestones[0]=50 is more than pretrain.epochs (1): the lr never reaches that milestone"
    sets = ["lr_span=run", "prune.restart_lr=false", "admm.epochs=4", "retrain.epochs=4", "retrain.schedule=step"]
    assert config.warnings_of(config.load_config(None, sets + ["retrain.milestones=[6]"])) == []
    said, = config.warnings_of(config.load_config(None, sets + ["retrain.milestones=[9]"]))
    assert "the epochs of every stage after pretraining" in said


def test_choices_come_from_the_registries():
    import admm
    from pruning.allocation import RULES
    from training.losses import LOSSES
    assert config.CHOICES["prune.sparsity_type"] == admm.SCHEMES
    assert config.CHOICES["prune.allocation"] == RULES
    assert config.CHOICES["adv.loss"] == tuple(LOSSES)
    assert config.CHOICES["data.dataset"] == tuple(data.INFO)
    assert set(config.CHOICES["prune.method"]) == {"admm", "gradual", "oneshot", "hydra", "harp"}


def test_a_stored_config_is_checked_as_a_file_is():
    cfg = config.load_config("configs/demo.yaml")
    assert config.check_stored(cfg, "x.pt") == cfg
    with pytest.raises(UserError, match="x.pt: its stored config is not valid: adv.eps: expected a finite"):
        config.check_stored({**cfg, "adv": {**cfg["adv"], "eps": float("nan")}}, "x.pt")
    resolved = {**cfg, "prune": {**cfg["prune"], "allocation": "lamp", "target": 0.0}}  # a run's, allocation applied
    assert config.check_stored(resolved, "x.pt")["prune"]["allocation"] == "lamp"


def test_docs_config_md_is_generated_from_the_ranges():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == config.reference(), "regenerate: python config.py > docs/config.md"
    keys = [line.split("`")[1] for line in config.reference().splitlines() if line.startswith("| `")]
    assert len(keys) == len(set(keys)) and "adv.eps" in keys and "quant.bits" in keys
    assert all(k in config.RANGES or k + ".*" in config.RANGES or k in config.CHOICES for k in keys
               if isinstance(config._get(config.DEFAULTS, k), (int, float)) and not isinstance(
                   config._get(config.DEFAULTS, k), bool))


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_demo_config_present():
    assert os.path.join(ROOT, "configs", "demo.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = config.load_config(path)
    assert set(cfg) == set(config.DEFAULTS)
    name = os.path.splitext(os.path.basename(path))[0]
    if name in data.INFO:
        assert cfg["data"]["dataset"] == name


def _arch_tables(path):
    """(arch, ratio table) pairs a shipped config can run with: its own arch, plus every arch it
    has a per-arch ``prune_ratios`` table for."""
    import yaml
    with open(path) as f:
        raw = yaml.safe_load(f).get("prune", {}).get("prune_ratios", {})
    archs = [a for a, v in raw.items() if isinstance(v, dict)] or [config.load_config(path)["model"]["arch"]]
    return [(a, config.load_config(path, [f"model.arch={a}"])) for a in archs]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_prune_ratios_name_real_parameters(path):
    import admm
    from models import build_model
    for arch, cfg in _arch_tables(path):
        info = data.INFO[cfg["data"]["dataset"]]
        model = build_model(arch, 1, info.num_classes, info.in_channels, info.image_size)
        ratios = admm.resolve_ratios(model, cfg["prune"]["prune_ratios"])  # raises on a stale name
        assert ratios and all(0 < r < 1 for r in ratios.values()), (arch, ratios)


def test_per_arch_ratio_tables():
    tables = "prune.prune_ratios={lenet: {fc1.weight: 0.9}, vgg16: {features.0.weight: 1/2}}"
    assert config.load_config(None, [tables])["prune"]["prune_ratios"] == {"fc1.weight": 0.9}
    assert config.load_config(None, [tables, "model.arch=vgg16"])["prune"]["prune_ratios"] == \
        {"features.0.weight": 0.5}
    with pytest.raises(UserError, match="prune.prune_ratios.*resnet18"):
        config.load_config(None, [tables, "model.arch=resnet18"])
    with pytest.raises(UserError, match="fc1.weight"):
        config.load_config(None, ["prune.prune_ratios={lenet: {fc1.weight: 1.5}}"])


def test_demo_config_values():
    cfg = config.load_config(os.path.join(ROOT, "configs", "demo.yaml"))
    assert cfg["data"]["dataset"] == "demo" and cfg["model"] == {"arch": "lenet", "width": 4}
    assert cfg["prune"]["prune_ratios"]["fc1.weight"] == 0.9


# --------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def demo():
    return data.load_data(config.load_config(None))


def test_demo_split_sizes_and_types(demo):
    train, test, info = demo
    assert info.name == "demo" and (info.in_channels, info.image_size, info.num_classes) == (1, 28, 10)
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.shape == (4000,)
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test.labels, minlength=10), torch.full((10,), 100))
    assert train.images.max() > 200 and train.images.float().mean() > 10  # real digits, not blank


def test_demo_train_and_test_disjoint(demo):
    train, test, _ = demo
    tr = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in tr for im in test.images)


def test_batches_floats_in_unit_range(demo):
    train, _, _ = demo
    n = 0
    for x, y in data.batches(train, 300, "cpu"):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        n += len(y)
    assert n == 4000 and data.num_batches(train, 300) == 14
    x, y = next(data.batches(train, 5, "cpu"))
    assert torch.equal(x, train.images[:5].float() / 255) and torch.equal(y, train.labels[:5])
    assert x.max() > 0.9  # scaled to [0, 1], not left in [0, 255] or squashed


def test_batches_shuffle_is_a_seeded_permutation(demo):
    train, _, _ = demo
    def labels(seed):
        return torch.cat([y for _, y in data.batches(train, 512, "cpu", shuffle=True, seed=seed)])
    a, b, c = labels(3), labels(3), labels(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.bincount(a), torch.bincount(train.labels))  # each example once


def test_batches_limit(demo):
    train, _, _ = demo
    assert sum(len(y) for _, y in data.batches(train, 64, "cpu", limit=100)) == 100
    assert data.num_batches(train, 64, limit=100) == 2


def test_limited_demo_subsets_cover_all_classes():
    # The bundled digits are stored sorted by class; train_limit and eval.limit take the first N
    # examples, so the splits must not be in class order (else a 1,000-digit run sees 0-2 only).
    train, test, _ = data.load_data(config.load_config(None, ["data.train_limit=1000"]))
    assert len(train.labels) == 1000
    assert torch.bincount(train.labels, minlength=10).min() >= 60
    first300 = torch.cat([y for _, y in data.batches(test, 128, "cpu", limit=300)])
    assert torch.bincount(first300, minlength=10).min() >= 15


def test_synthetic_data_shapes():
    cfg = config.load_config(None, ["data.dataset=cifar10", "data.synthetic=true", "data.train_limit=40"])
    train, test, info = data.load_data(cfg)
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (64, 3, 32, 32) and info.augment


def _crop_flip_matches(x, out):
    """[N, 9, 9, 2] bool: does ``out[k]`` equal the crop at offset (i, j) of the 4-pixel
    zero-padded ``x[k]``, unflipped (0) or horizontally flipped (1)? Brute force over all 162."""
    n, c, h, w = x.shape
    crops = torch.nn.functional.pad(x, (4, 4, 4, 4)).unfold(2, h, 1).unfold(3, w, 1)  # [N, C, 9, 9, h, w]
    crops = crops.permute(0, 2, 3, 1, 4, 5)                                          # [N, 9, 9, C, h, w]
    same = (crops == out[:, None, None]).flatten(3).all(-1)
    flipped = (crops.flip(-1) == out[:, None, None]).flatten(3).all(-1)
    return torch.stack([same, flipped], -1)


def test_augment_is_padded_crop_plus_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 3, 6, 5, generator=g) + 0.1  # non-square, no zeros, distinct values
    out = data._augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    m = _crop_flip_matches(x, out)
    assert m.flatten(1).any(1).all(), "some output is not a crop (+ flip) of its padded input"
    assert (m.flatten(1).sum(1) == 1).all()  # distinct pixel values: the match is unique
    # Every one of the 81 offsets and both flip states occur (P(miss) ~ 81 * (80/81)^2000).
    assert m.any(0).any(-1).all(), "some crop offsets never drawn"
    assert m.any(0).any(0).any(0).all(), "flip never / always applied"
    flip_rate = m[..., 1].flatten(1).any(1).float().mean().item()
    assert 0.4 < flip_rate < 0.6


def test_augment_reproducible_and_small_case_by_hand():
    x = torch.rand(64, 1, 4, 4) + 0.1
    a = data._augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, data._augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, data._augment(x, torch.Generator().manual_seed(6)))
    # By hand: a 2x2 image at offset (8, 8) of its padding is all zeros, at (4, 4) itself.
    img = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    outs = {tuple(data._augment(img, torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(400)}
    assert (1.0, 2.0, 3.0, 4.0) in outs and (2.0, 1.0, 4.0, 3.0) in outs  # identity, flipped
    assert (0.0, 0.0, 0.0, 0.0) in outs and (0.0, 0.0, 0.0, 1.0) in outs  # pure padding, corner pixel
    assert (4.0, 0.0, 0.0, 0.0) in outs   # offset (5, 5): bottom-right pixel at top-left
    assert all(set(o) <= {0.0, 1.0, 2.0, 3.0, 4.0} for o in outs)


def test_batches_augment_changes_training_batches_only_when_asked():
    train = data.Split(torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.zeros(16, dtype=torch.long))
    plain = next(data.batches(train, 16, "cpu"))[0]
    aug = next(data.batches(train, 16, "cpu", augment=True))[0]
    assert torch.equal(plain, train.images.float() / 255)
    assert not torch.equal(aug, plain) and aug.shape == plain.shape
    assert aug.min() >= 0 and aug.max() <= 1
