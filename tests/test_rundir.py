"""The run folder's files read back through one checked reader each (training/rundir.py):
metrics.jsonl (a torn last line dropped and said, any other damage one line), config.yaml, and
the run's own checkpoints; and what the training command says when it stops."""
import logging
import os

import pytest

from common import UserError
from training import command
from training.rundir import RunFolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_with(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_bytes(text)
    return RunFolder(str(tmp_path))


@pytest.mark.parametrize("tail", [b'{"kind": "epo', b'{"kind": "epoch"}', b"\xff\xfe", b"garbage"])
def test_a_torn_last_line_is_dropped_and_said(tmp_path, caplog, tail):
    folder = folder_with(tmp_path, b'{"kind": "epoch", "epoch": 1}\n' + tail)  # unterminated: torn
    with caplog.at_level(logging.WARNING, logger="admm_at"):
        assert folder.read_metrics(repair=False) == [{"kind": "epoch", "epoch": 1}]
    assert "dropped the torn last line" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_bytes().endswith(tail)  # a reader that does not own it: untouched
    assert folder.read_metrics() == [{"kind": "epoch", "epoch": 1}]
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"kind": "epoch", "epoch": 1}\n'  # the owner cuts it


def test_a_cut_last_line_ended_by_a_newline_is_torn_too(tmp_path):
    folder = folder_with(tmp_path, b'{"a": 1}\n{"a": \n')
    assert folder.read_metrics() == [{"a": 1}] and (tmp_path / "metrics.jsonl").read_bytes() == b'{"a": 1}\n'
    folder.drop_metrics(["admm"])  # the --overwrite path that was a JSONDecodeError
    assert folder.read_metrics() == [{"a": 1}]


@pytest.mark.parametrize("middle", [b"{not json", b"[1, 2]", b"\x00\x01", b"3"])
def test_a_damaged_line_before_the_last_is_one_line_naming_it(tmp_path, middle):
    folder = folder_with(tmp_path, b'{"a": 1}\n' + middle + b'\n{"a": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl is damaged at line 2 .* move the file away") as e:
        folder.drop_metrics(["admm"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,match", [(b"adv: [unclosed\n", "not valid YAML"), (b"\xff\xfe", "not UTF-8"),
                                        (b"", "is empty"), (b"seed: 1\nseed: 2\n", "given twice"),
                                        (b"- a\n", "mapping")])
def test_a_damaged_config_yaml_is_one_line_with_the_fix(tmp_path, text, match):
    (tmp_path / "config.yaml").write_bytes(text)
    with pytest.raises(UserError, match=match) as e:
        RunFolder(str(tmp_path)).read_config()
    assert "remove it to resume without comparing the configs" in str(e.value)
    assert RunFolder(str(tmp_path / "none")).read_config() is None


def test_a_damaged_last_checkpoint_says_how_to_go_on(tmp_path):
    (tmp_path / "admm.last.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(UserError, match="delete it to run stage admm again from its start .*--overwrite"):
        RunFolder(str(tmp_path)).read_checkpoint(str(tmp_path / "admm.last.pt"))


def test_training_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        command.run(["--config", "configs/demo.yaml", "--bogus"])
    line, = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and line.startswith("error: unrecognized arguments: --bogus (see ")


@pytest.mark.parametrize("saved", [False, True])
def test_a_second_signal_says_resume_only_when_there_is_a_checkpoint(tmp_path, monkeypatch, capsys, saved):
    def interrupted(args, adversarial, cfg, folder, stages, device):
        if saved:
            (tmp_path / "pretrain.last.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "_run_stages", interrupted)
    with pytest.raises(SystemExit) as e:
        command.run(["--config", "configs/demo.yaml", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 130
    if saved:
        assert "are intact; continue with: " in err and "--resume" in err
    else:
        assert "no checkpoint of this run was saved yet; start it again with:" in err and "--resume" not in err
