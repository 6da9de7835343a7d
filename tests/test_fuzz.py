"""Fuzzing the inputs a user hands the scripts (Hypothesis): config values of every type and edge,
``--set`` strings, ``eval.py`` flags, and damaged checkpoint and export files. Every case ends in
a valid plan (or a loaded model) or in one ``UserError``: one line, naming the key or flag; never
another exception, and never a damaged file read as a good one.

The budget and seeds are fixed in CI (the "ci" profile in conftest.py); a long random run by hand:
    HYPOTHESIS_PROFILE=long python -m pytest -n0 tests/test_fuzz.py --hypothesis-show-statistics
"""
import json
import math
import os
import re
import tempfile

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st


from deploy import formats
import config
import data
from training import command as engine
from common import UserError, load_checkpoint
from models import build_model, load_weights, model_from_config
from pruning.plan import make_stage, stage_names
from training.rundir import RunFolder
from training.state import lr_at

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
DEMO = os.path.join(os.path.dirname(GOLDEN), "..", "configs", "demo.yaml")
CHEAP = settings(max_examples=max(10, settings.default.max_examples // 4),  # each loads a model
                 suppress_health_check=[HealthCheck.too_slow])


def flat_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in config.TABLES:
            yield from flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


KEYS = sorted(flat_keys(config.DEFAULTS))
# every key, a per-layer entry of each table, and keys that do not exist
ALL_KEYS = KEYS + ["prune.prune_ratios.fc1.weight", "prune.prune_ratios.conv*.weight", "quant.bits.fc2.weight",
                   "quant.bits.*", "prune.prune_ratios.conv9.weight", "adv.epss", "advv.eps", "seed.x", "data", "",
                   "adv..eps", "prune.prune_ratios"]
NAMES = [k for k in KEYS + [s for s in config.DEFAULTS]]  # what a message may name

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
EDGES = st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 1, -0.0, 0.5, 1.0, 2, 1e-300, 1e308, 10 ** 30,
                         -10 ** 30, 2 ** 63, "", " ", "nan", ".nan", "inf", "1/0", "8/255", "-1/3", "1e400", "é",
                         "\x00", "a\nb", None, True, False, [], {}, [0.8, 1.0], [1, "a"], {"a": 1},
                         {"fc1.weight": 0.5}, {"lenet": {"fc1.weight": 0.5}}, "lenet", "vgg16", "sgd", "filter"])
VALUES = st.one_of(EDGES, st.integers(), st.floats(), TEXT, st.lists(st.one_of(st.integers(), st.floats(), TEXT),
                                                                      max_size=4),
                   st.dictionaries(TEXT, st.one_of(st.integers(), st.floats(), TEXT), max_size=3))


def plan(path=None, overrides=()):
    """What adv_main.py does with a config before any work, in-process: load and check it, pick
    the stages, resolve each layer's ratio and bits on the model (built on the meta device:
    shapes only, no memory), and build every stage. Returns the stage names."""
    cfg = config.load_config(path, overrides)
    info = data.INFO[cfg["data"]["dataset"]]
    with torch.device("meta"):
        model = build_model(cfg["model"]["arch"], cfg["model"]["width"], info.num_classes, info.in_channels,
                            info.image_size)
    names = stage_names(cfg)
    engine._check_pruning(cfg, model, names)
    for name in names:
        make_stage(name, model, cfg)
    for section in config.STAGE_SECTIONS:
        lr_at(cfg[section], 0, cfg[section]["epochs"])
    return names


def one_line_naming(e, *names):
    """``e``'s message is one line that names one of ``names`` (as given or as repr) or a config key."""
    msg = str(e)
    assert msg and "\n" not in msg, msg
    named = any(n and (n in msg or repr(n) in msg) for n in names if n.strip()) or any(re.search(rf"\b{re.escape(k)}\b", msg)
                                                                         for k in NAMES)
    assert named, (names, msg)


def nested(key, value):
    """{"a": {"b": value}} for the dotted ``key`` "a.b"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@given(key=st.sampled_from(ALL_KEYS), value=VALUES, base=st.booleans())
def test_config_values_give_a_plan_or_one_line_naming_the_key(key, value, base):
    """A YAML config file holding one value of any type at any key (over the demo config or the
    defaults)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        try:
            yaml.safe_dump({**(yaml.safe_load(open(DEMO)) if base else {}), **nested(key, value)}, f)
        except yaml.YAMLError:
            assume(False)
    try:
        names = plan(f.name)
        assert names[0] == "pretrain"
    except UserError as e:
        one_line_naming(e, key, key.split(".")[-1])
    finally:
        os.remove(f.name)


@given(key=st.one_of(st.sampled_from(ALL_KEYS), TEXT), raw=st.one_of(TEXT, EDGES.map(str)),
       eq=st.sampled_from(["=", " = ", "", "=="]))
def test_set_strings_give_a_plan_or_one_line_naming_the_key(key, raw, eq):
    item = f"{key}{eq}{raw}"
    try:
        plan(DEMO, [item])
    except UserError as e:
        one_line_naming(e, key.strip(), repr(item), key.split(".")[-1].strip())


EVAL_FLAGS = ["--attacks", "--eps", "--steps", "--step-size", "--restarts", "--eps-l2", "--eps-sweep", "--plot",
              "--no-checks", "--limit", "--json", "--device", "--seed", "--ep", "--bogus", "-x"]


@given(args=st.lists(st.tuples(st.sampled_from(EVAL_FLAGS), st.one_of(TEXT, EDGES.map(str), st.none())), max_size=5))
def test_eval_flags_give_attacks_or_one_line_naming_the_flag(args):
    argv = ["--ckpt", "x.pt"] + [a for flag, v in args for a in ((flag,) if v is None else (flag, v))]
    cfg = config.load_config(DEMO)
    eval_py = __import__("eval")
    try:
        attacks, checks, sweep = eval_py.attacks_of(eval_py.parse(argv), cfg)
        assert attacks
    except UserError as e:  # names the flag, or the words argparse did not take
        one_line_naming(e, "--", *[v for _, v in args if v])


# --------------------------------------------------------------------------- damaged files

def golden(name):
    with open(os.path.join(GOLDEN, name), "rb") as f:
        return f.read()


FILES = {name: golden(name) for name in ("retrain.pt", "retrain.export.pt")}


@pytest.fixture(scope="module")
def reference_outputs():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, _, _ = formats.load_model(os.path.join(GOLDEN, "retrain.pt"))
    with torch.no_grad():
        return x, model(x)


def load_damaged(blob, reference_outputs):
    """Write ``blob`` and read it as eval.py does: refused in one line, or (damage where nothing
    is read: zip padding, an unused header field) the very same model."""
    with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
        f.write(blob)
    try:
        model, _, _ = formats.load_model(f.name)
    except UserError as e:
        one_line_naming(e, f.name)
        return False
    finally:
        os.remove(f.name)
    x, expected = reference_outputs
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)  # same weights, not silently others
    return True


@CHEAP
@given(name=st.sampled_from(sorted(FILES)), flips=st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(1, 255)),
                                                           min_size=1, max_size=3))
def test_flipped_bytes_are_refused_in_one_line_or_change_nothing(name, flips, reference_outputs):
    blob = bytearray(FILES[name])
    for offset, mask in flips:
        blob[offset % len(blob)] ^= mask
    load_damaged(bytes(blob), reference_outputs)


@CHEAP
@given(name=st.sampled_from(sorted(FILES)), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused_in_one_line(name, keep, reference_outputs):
    assert not load_damaged(FILES[name][:int(keep * len(FILES[name]))], reference_outputs)


def leaves(d, prefix=()):
    """The key paths of a nested dict, down to its leaves (tensors and plain values)."""
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))


OBJECTS = {name: torch.load(os.path.join(GOLDEN, name), weights_only=True) for name in FILES}
PATHS = {name: sorted(leaves(obj), key=str) for name, obj in OBJECTS.items()}
WRONG = st.one_of(
    st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype), st.lists(st.integers(0, 3), max_size=3),
              st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool, torch.float16])),
    EDGES, st.just("__delete__"))


@CHEAP
@given(name=st.sampled_from(sorted(FILES)), data_=st.data())
def test_a_valid_zip_with_wrong_contents_is_refused_in_one_line(name, data_):
    """The file is a good archive of plain data, but an entry (a tensor, a config value, a key)
    is replaced by a tensor of another shape or type, a plain value, or removed."""
    import copy
    obj = copy.deepcopy(OBJECTS[name])
    for _ in range(data_.draw(st.integers(1, 2))):
        path = data_.draw(st.sampled_from(PATHS[name]))
        parent = obj
        try:
            for k in path[:-1]:
                parent = parent[k]
        except (KeyError, TypeError):
            continue  # an earlier change removed it
        if not isinstance(parent, dict):
            continue
        wrong = data_.draw(WRONG)
        if isinstance(wrong, str) and wrong == "__delete__":
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = wrong
    with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
        torch.save(obj, f)
    try:
        for read in (lambda p: formats.load_model(p), init_from):
            try:
                read(f.name)
            except UserError as e:
                one_line_naming(e, f.name)
    finally:
        os.remove(f.name)


def init_from(path):
    """What ``--init PATH`` reads before training: the checkpoint, its weights into the model of
    the run's config (here the checkpoint's own arch and width)."""
    ckpt = load_checkpoint(path)
    cfg = config.load_config(DEMO, ["model.width=1"])
    load_weights(model_from_config(cfg, data.INFO["demo"], "cpu"), ckpt, path, cfg)


# --------------------------------------------------------------------------- hostile configs

DEMO_TEXT = yaml.safe_dump(yaml.safe_load(open(DEMO)), sort_keys=False)
KEY_LINE = re.compile(r"^\s*([^\s:#-][^:]*):")


@given(lines=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)), min_size=1, max_size=3),
       nested_=st.booleans())
def test_configs_with_a_key_given_twice_are_one_line_naming_it(lines, nested_):
    """A line of the demo config copied to another place in the file: a key line that lands in
    its own mapping is an error naming the key and both lines; anything else gives a plan or
    one line."""
    text = DEMO_TEXT.splitlines() if not nested_ else yaml.safe_dump(config.DEFAULTS, sort_keys=False).splitlines()
    for src, dst in lines:
        text.insert(dst % (len(text) + 1), text[src % len(text)])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("\n".join(text) + "\n")
    try:
        plan(f.name)
    except UserError as e:
        if "given twice" in str(e):
            key, = re.search(r"key (.+) is given twice, on lines (\d+) and (\d+)", str(e)).groups()[:1]
            first, second = map(int, re.search(r"on lines (\d+) and (\d+)", str(e)).groups())
            assert first < second and KEY_LINE.match(text[second - 1]).group(1) == yaml.safe_load(key)
        one_line_naming(e, f.name)
    finally:
        os.remove(f.name)


def range_keys():
    """[(a ``RANGES`` key, the --set key that sets it, how a value is written there)]."""
    out = []
    for key in config.RANGES:
        if key in ("prune.prune_ratios.*", "quant.bits.*"):
            out.append((key, key.replace("*", "fc1.weight"), "{}"))
        elif key == "prune.rounds.*":
            out.append((key, "prune.rounds", "[{}, 1.0]"))
        elif key == "prune.rate_rounds.*":
            out.append((key, "prune.rate_rounds", "[{}, 100]"))
        elif key.endswith(".*"):
            out.append((key, key[:-2], "[{}]"))
        else:
            out.append((key, key, "{}"))
    return out


NEAR = st.sampled_from([0, 1, -1, 0.5, 1e-9, -1e-9, 1 - 1e-9, 1 + 1e-9, 16, 17, 1024, 1025, 2 ** 32 - 1, 2 ** 32,
                        10, 11, 10 ** 12, -10 ** 12, 1e300, -1e300, 2 ** 64])
NON_FINITE = st.sampled_from([".nan", ".inf", "-.inf", ".NaN", "1e400", "-1e400", "nan", "inf", "1/0", "0/0"])


@given(target=st.sampled_from(range_keys()), value=st.one_of(NEAR, NON_FINITE, st.integers(), st.floats()),
       base=st.sampled_from([None, DEMO]))
def test_out_of_range_values_are_one_line_and_an_accepted_value_is_in_range(target, value, base):
    """Values at and beyond each range's ends, huge and non-finite: refused in one line naming
    the key, or accepted and then inside the range ``config.RANGES`` documents."""
    key, set_key, form = target
    try:
        cfg = config.load_config(base, [f"{set_key}={form.format(value)}"])
        plan(base, [f"{set_key}={form.format(value)}"])
    except UserError as e:
        one_line_naming(e, set_key, key[:-2] if key.endswith(".*") else key)
        return
    for _, v in config._values(cfg, key):
        assert config.RANGES[key].holds(v) and math.isfinite(v), (key, v)


@CHEAP
@given(key=st.sampled_from(KEYS), value=st.one_of(EDGES, NON_FINITE, NEAR))
def test_a_stored_config_out_of_range_is_one_line_naming_the_file(key, value):
    """A checkpoint's stored config with one value replaced (eval.py and export.py check it
    before any work)."""
    cfg = torch.load(os.path.join(GOLDEN, "retrain.pt"), weights_only=True)["config"]
    *parents, leaf = key.split(".")
    section = cfg
    for p in parents:
        section = section.setdefault(p, {})  # a section newer than the golden checkpoint
    section[leaf] = yaml.safe_load(value) if isinstance(value, str) and value.startswith((".", "-.")) else value
    try:
        config.check_stored(cfg, "stored.pt")
    except UserError as e:
        assert str(e).startswith("stored.pt: its stored config is not valid: ")
        one_line_naming(e, key)


# --------------------------------------------------------------------------- damaged run folders

ROWS = [{"kind": "epoch", "stage": s, "epoch": e, "loss": 0.5 / e, "test_pgd": None} for s in ("pretrain", "admm")
        for e in (1, 2)]
CLEAN = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@given(cut=st.integers(0, len(CLEAN)))
def test_a_metrics_file_cut_anywhere_is_recovered(cut):
    """A kill at any byte of an append: the whole rows before the cut come back, the torn one is
    dropped, nothing else is lost."""
    with tempfile.TemporaryDirectory() as d:
        folder = RunFolder(d)
        with open(folder.metrics, "wb") as f:
            f.write(CLEAN[:cut])
        rows = folder.read_metrics()
        assert rows == ROWS[:CLEAN[:cut].count(b"\n")]
        folder.drop_metrics(["admm"])  # what --overwrite of the admm stage does
        assert folder.read_metrics() == [r for r in rows if r["stage"] != "admm"]


@given(flips=st.lists(st.tuples(st.integers(0, len(CLEAN) - 1), st.binary(min_size=0, max_size=4)), min_size=1,
                      max_size=4))
def test_a_damaged_metrics_file_is_read_or_one_line_naming_it(flips):
    blob = bytearray(CLEAN)
    for at, new in flips:
        blob[at:at + 1] = new
    with tempfile.TemporaryDirectory() as d:
        folder = RunFolder(d)
        with open(folder.metrics, "wb") as f:
            f.write(blob)
        try:
            rows = folder.read_metrics()
            folder.drop_metrics(["admm"])
            assert all(isinstance(r, dict) for r in rows)
        except UserError as e:
            one_line_naming(e, folder.metrics)


@given(blob=st.one_of(st.binary(max_size=64), TEXT.map(str.encode),
                      st.builds(lambda t, i, b: t[:i] + b + t[i:], st.just(DEMO_TEXT.encode()),
                                st.integers(0, len(DEMO_TEXT)), st.binary(min_size=1, max_size=8))))
def test_a_damaged_run_config_is_read_or_one_line_naming_it(blob):
    """The run folder's config.yaml, damaged, on --resume (``_prepare_folder`` compares it with
    the new config)."""
    with tempfile.TemporaryDirectory() as d:
        folder = RunFolder(d)
        with open(folder.file("config.yaml"), "wb") as f:
            f.write(blob)
        try:
            old = folder.read_config()
            engine._flat(old)
        except UserError as e:
            one_line_naming(e, folder.file("config.yaml"))


@CHEAP
@given(keep=st.floats(0, 1, exclude_max=True), flips=st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(1, 255)),
                                                             max_size=3))
def test_a_damaged_last_checkpoint_is_one_line_with_the_fix(keep, flips):
    blob = bytearray(FILES["retrain.pt"][:int(keep * len(FILES["retrain.pt"]))])
    for at, x in flips:
        if blob:
            blob[at % len(blob)] ^= x
    with tempfile.TemporaryDirectory() as d:
        folder = RunFolder(d)
        with open(folder.last("admm"), "wb") as f:
            f.write(blob)
        with pytest.raises(UserError) as e:
            folder.read_checkpoint(folder.last("admm"))
        one_line_naming(e.value, folder.last("admm"))
        assert "delete it to run stage admm again from its start" in str(e.value)
