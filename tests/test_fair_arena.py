"""Finding 5's fair arena report (experiments/fair_arena.py) on records made by hand: the setting
of record is chosen on the validation split only, never on the test figures; a dropped candidate
is never chosen; no choice before every candidate has finished."""
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import fair_arena  # noqa: E402
from spec import load_spec  # noqa: E402
from sweep import plan  # noqa: E402

SPEC = load_spec(os.path.join(ROOT, "experiments", "arena_fair.yaml"))


def record(cell, natural=0.7, pgd=0.5, val=0.5, energy=0.01):
    """A finished cell's record as sweep.py writes it, with the figures given."""
    ev = {"accuracy": {"natural": natural, "pgd": pgd}, "sparsity": {"overall": cell["meta"].get("target", 0.0)},
          "convergence": {"admm": {"pruned_energy": {"conv1": energy}}}}
    return {"id": cell["id"], "finding": cell["finding"], "kind": cell["kind"], "seed": cell["seed"],
            "meta": cell["meta"], "deps": cell["deps"], "commands": [], "wall_s": 60.0, "eval": ev,
            "val": {"natural": natural, "pgd": val, "stage": "retrain", "epoch": 12}, "lrs": [0.002] * 12}


@pytest.fixture(scope="module")
def cells():
    return {c["id"]: c for c in plan(SPEC) if c["seed"] == 0}


def summary_of(records):
    return {"spec": SPEC, "planned": [c["id"] for c in plan(SPEC)], "cells": records}


def test_setting_of_record_is_chosen_on_validation_never_on_test(cells):
    ids = {"a": "hydra-lamp-t99-main-s0", "h1": "hydra-lamp-t99-b12-h1-s0", "h2": "hydra-lamp-t99-b12-h2-s0"}
    recs = [record(cells[ids["a"]], pgd=0.70, val=0.50),   # best on the test set, worst on validation
            record(cells[ids["h1"]], pgd=0.40, val=0.60),  # tied best on validation, listed first: chosen
            record(cells[ids["h2"]], pgd=0.80, val=0.60)]
    rs, T, settings = fair_arena.tables(summary_of(recs))
    assert settings[("hydra", 0.99, 12, 0)] == "h1"
    assert T.values(("b12", 0.99, "hydra", "lamp"), "pgd") == [0.40]
    assert T.values(("a12", 0.99, "hydra", "lamp"), "pgd") == [0.70]  # protocol (a)'s table keeps its own cell
    assert T.values(("b12:h2", 0.99, "hydra", "lamp"), "pgd") == [0.80]  # a candidate not chosen: its own table


def test_a_dropped_candidate_is_never_chosen_and_no_choice_before_all_ran(cells):
    a, a1, a2 = "admm-lamp-t95-main-s0", "admm-lamp-t95-b12-a1-s0", "admm-lamp-t95-b12-a2-s0"
    recs = [record(cells[a], val=0.50), record(cells[a1], val=0.90, energy=0.20),  # not converged: dropped
            record(cells[a2], val=0.55)]
    _, T, settings = fair_arena.tables(summary_of(recs))
    assert settings[("admm", 0.95, 12, 0)] == "a2"
    _, T, settings = fair_arena.tables(summary_of(recs[:2]))  # a2 still to run
    assert settings[("admm", 0.95, 12, 0)] is None and not T.values(("b12", 0.95, "admm", "lamp"), "pgd")


def test_section_reads_as_the_spec_plans(cells, tmp_path):
    """Every planned seed-0 cell finished with the same figures but one-shot's (b) setting o2 best on
    validation: the section has each table, the choice, and answers that follow from them."""
    recs = [record(c, val=0.6 if c["id"] == "oneshot-lamp-t99-b12-o2-s0" else 0.5,
                   pgd=0.6 if c["id"] == "oneshot-lamp-t99-b12-o2-s0" else 0.5) for c in cells.values()]
    text = fair_arena.write(summary_of(recs), str(tmp_path))
    for heading in ("### protocol (a), equal terms, 12 epochs", "### protocol (b), each method at its own protocol, 36 epochs",
                    "### from the start 'e10'", "**The pretrained starts**", "### Answers to the pre-registered questions"):
        assert heading in text, heading
    assert "| 12 | 99 % | one-shot | 0: o2, 1: ..., 2: ... |" in text  # seeds 1 and 2: not run
    assert "99 %, 12 epochs: one-shot" in text  # question 4 under (b): the only row ahead
    assert "99 %, 12 epochs, ResNet-18 w=2: " in text and "r18: " in text  # questions 4 and 2: the second network too
    assert (tmp_path / "arena_fair.png").stat().st_size > 1000


def test_after_b12_names_the_resnet_rows_and_autoattack_cells_by_the_rules():
    """Every 12-epoch cell of seeds 0-2 finished. Test PGD of the rows of record ranks one-shot,
    gradual, progressive first; HYDRA's h2 wins validation in seeds 0 and 1 and h1 in seed 2, so
    h2; every other candidate ties on validation, so the protocol-(a) cell (listed first)."""
    pgd = {"oneshot": 0.60, "gradual": 0.59, "progressive": 0.58, "admm": 0.55, "hydra": 0.50, "harp": 0.49,
           "admm_harp": 0.40}
    h2_wins = {"hydra-lamp-t99-b12-h2-s0", "hydra-lamp-t99-b12-h2-s1", "hydra-lamp-t99-b12-h1-s2"}
    recs = [record(c, pgd=pgd[c["meta"]["method"]], val=0.7 if c["id"] in h2_wins else 0.5)
            for c in plan(SPEC) if c["kind"] in pgd and c["meta"]["variant"] in ("main",) + tuple(
                n for n in SPEC["arena"]["variants"] if n.startswith("b12-"))]
    lines = fair_arena.after_b12(summary_of(recs))
    rows = [line.split("   #")[0] for line in lines if line.startswith("r18-")]
    assert rows == ["r18-oneshot: {methods: [oneshot], seeds: [0, 1], targets: [0.99], start: r18}",
                    "r18-gradual: {methods: [gradual], seeds: [0, 1], targets: [0.99], start: r18}",
                    "r18-progressive: {methods: [progressive], seeds: [0, 1], targets: [0.99], start: r18}",
                    "r18-hydra: {<<: *h2, seeds: [0, 1], targets: [0.99], start: r18}",
                    "r18-harp: {methods: [harp], seeds: [0, 1], targets: [0.99], start: r18}"]
    assert lines[-1] == "[hydra-lamp-t99-b12-h2-s0]"  # the only seed-0 row of record that is not an (a) cell
    with pytest.raises(fair_arena.UserError, match="waiting: hydra"):
        fair_arena.after_b12(summary_of([r for r in recs if r["id"] != "hydra-lamp-t95-b12-h1-s1"]))


def test_cells_started_from_a_rebuilt_checkpoint_are_named(cells):
    """sweep.check_again marks the cells that started from a checkpoint rebuilt with other figures."""
    start = {"record": {"natural": 0.787, "pgd": 0.627}, "rebuilt": {"natural": 0.787, "pgd": 0.626}}
    recs = [record(c) for c in cells.values() if c["kind"] == "pretrain"]
    recs += [{**record(cells["hydra-lamp-t99-a36-s0"]), "rebuilt_inputs": {"pre-adv-w4-s0": start}},
             {**record(cells["harp-learned-t99-a36-s0"]), "rebuilt_inputs": {"pre-adv-w4-s0": start}},
             record(cells["oneshot-lamp-t99-a36-s0"])]
    text, _ = fair_arena.section(summary_of(recs))
    assert "- pre-adv-w4-s0: 78.7 / 62.7 -> 78.7 / 62.6; 2 cells: harp-learned-t99-a36-s0, hydra-lamp-t99-a36-s0" in text
    assert "Rebuilt inputs" not in fair_arena.section(summary_of(recs[:-3]))[0]


def test_the_claim_waits_only_for_the_cells_it_reads():
    """Every cell finished but the check row's (another start, not read by the claim): the verdict
    is given; ADMM ties one-shot everywhere, so it never beats it: did not hold. Without one
    protocol-(b) candidate it is not decided."""
    elsewhere = [c for c in plan(SPEC) if c["meta"].get("start") == "e10"]
    assert len(elsewhere) == 16  # the e10 start, its AutoAttack and 14 check-row cells
    recs = [record(c) for c in plan(SPEC) if c not in elsewhere]
    assert "Verdict: **did not hold**" in fair_arena.section(summary_of(recs))[0]
    recs = [r for r in recs if r["id"] != "admm-lamp-t99-b36-a2-s1"]
    assert "Verdict: not decided (cells missing: 1 still to run)" in fair_arena.section(summary_of(recs))[0]


def test_the_readme_picks_what_finding_5_answers():
    """README's "What to use" table names, per sparsity, budget and network, the pick and the rows
    within noise of it that question 4 of the committed Finding 5 (docs/results/arena_fair.md,
    regenerated from the record) gives."""
    section = open(os.path.join(ROOT, "docs", "results", "arena_fair.md"), encoding="utf-8").read()
    q4 = next(line for line in section.splitlines() if line.startswith("4. "))
    answers = {}
    for part in q4.split("? ", 1)[1].rstrip(".").split("; "):
        where, pick = part.split(": ", 1)
        pick, _, near = pick.replace(" (lamp)", "").partition(" (within noise: ")
        answers[where] = (pick, near.rstrip(")") or "none")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("## What to use"):].split("\n\n")[2].splitlines()[2:]
    rows = {}
    for line in table:
        pruned, epochs, net, pick, near = (x.strip() for x in line.strip("|").split("|"))
        where = f"{pruned}, {epochs} epochs" + ("" if net.startswith("LeNet") else f", {net}")
        rows[where] = (pick, near)
    assert rows == answers


def test_what_the_start_did_pairs_the_check_row_with_protocol_a(cells):
    """The check row's cells (from the e10 start) against protocol (a)'s 12-epoch cells of the same
    seed: the converged start's gain in PGD points, by hand (seed 1, with no check cell, is left
    out); a dropped check cell says so. The line follows the e10 table, and the start table gives
    e10's configured epochs (it ran no validation)."""
    s1 = next(c for c in plan(SPEC) if c["id"] == "oneshot-lamp-t95-main-s1")
    recs = [record(cells["oneshot-lamp-t95-main-s0"], pgd=0.62), record(cells["oneshot-lamp-t95-check10-s0"], pgd=0.60),
            record(s1, pgd=0.90), record(cells["pre-adv-w4-s0-e10"]),
            record(cells["hydra-lamp-t95-main-s0"], pgd=0.55), record(cells["hydra-lamp-t95-check10-s0"], pgd=0.58),
            record(cells["admm-lamp-t99-main-s0"]), record(cells["admm-lamp-t99-check10-s0"], energy=0.2)]
    text, _ = fair_arena.section(summary_of(recs))
    assert "(pretrain.epochs=10, pretrain.patience=0), protocol (a), paired by seed: 95 %: one-shot (lamp) +2.0, " \
           "HYDRA (lamp) -3.0; 99 %: ADMM (lamp) dropped." in text
    assert text.index("### from the start 'e10'") < text.index("**What the start did.**") < text.index("### Answers")
    assert "| e10 | 0 | 10 | 10 | - | 70.0 | 50.0 | - |" in text
