"""The report frame every finding plugs into: tables over seeds, the noise rule, the verdict
wording, the section writer, the command line, and the checked reading of a sweep's summary.

A finding is a ``Finding``: its number and claim, the spec section that asks for it, ``plan`` (add
its cells to a ``Cells`` plan) and ``section`` (its text from a sweep's summary). ``findings.py``
lists them in order; ``sweep.py`` and ``report.py`` loop over that list.
"""
import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import UserError, run_cli  # noqa: E402

HELD, PARTLY, NOT_HELD = "**held**", "**partly held**", "**did not hold**"
MISSING = "not decided (cells missing)"
NOISY = " by the means, but some margins are within noise"


# --------------------------------------------------------------------------- verdicts and noise

def verdict(held, partly=False, why=""):
    """The wording of a verdict: held, else partly held (with ``why`` in brackets) when ``partly``,
    else did not hold."""
    if held:
        return HELD
    if partly:
        return PARTLY + (f" ({why})" if why else "")
    return NOT_HELD


def tally(wins, n):
    """The verdict of a claim tested ``n`` times (n >= 1) that won ``wins`` of them."""
    return verdict(wins == n, wins > 0)


def verdict_in(text):
    """The verdict a section states (its first "Verdict: ..." sentence), or "see the section"."""
    return next((line.split("Verdict: ", 1)[1].rstrip(".") for line in text.splitlines() if "Verdict: " in line),
                "see the section")


def binomial_se(limit):
    """The binomial standard error of an accuracy near 50 % measured on ``limit`` images."""
    return (0.25 / limit) ** 0.5


def within_noise(T, a, b, metric, limit):
    """Whether the means of keys ``a`` and ``b`` of ``T`` (anything with ``mean`` and ``values``)
    differ by less than the larger half-range over seeds or the binomial standard error at 50 % on
    ``limit`` images. False when either mean is missing."""
    ma, mb = T.mean(a, metric), T.mean(b, metric)
    if ma is None or mb is None:
        return False
    spread = max(((max(v) - min(v)) / 2 for v in (T.values(a, metric), T.values(b, metric))), default=0)
    return abs(ma - mb) < max(spread, binomial_se(limit))


# --------------------------------------------------------------------------- tables

class Table:
    """Rows (dicts, one per cell) grouped over seeds by the values of ``fields``: a key is the tuple
    of those values, built with ``key(field=value, ...)`` (fields not named are None). Excluded
    seeds (``row["excluded"]``) are left out of every figure but ``excluded``."""

    def __init__(self, rows, fields):
        self.fields, self.groups = tuple(fields), {}
        for r in rows:
            self.groups.setdefault(tuple(r.get(f) for f in self.fields), []).append(r)

    def key(self, **values):
        unknown = set(values) - set(self.fields)
        if unknown:
            raise KeyError(f"not a field of this table: {', '.join(sorted(unknown))}")
        return tuple(values.get(f) for f in self.fields)

    def kept(self, key):
        return [r for r in self.groups.get(key, []) if not r.get("excluded")]

    def excluded(self, key):
        return sum(bool(r.get("excluded")) for r in self.groups.get(key, []))

    def seeds(self, key):
        return len(self.kept(key))

    def values(self, key, metric):
        """The kept seeds' values of ``metric`` (None, a figure a cell lacks, left out)."""
        return [r[metric] for r in self.kept(key) if r.get(metric) is not None]

    def mean(self, key, metric):
        v = self.values(key, metric)
        return statistics.fmean(v) if v else None

    def spread(self, key, metric):
        """Half the range over seeds (0 without values)."""
        v = self.values(key, metric)
        return (max(v) - min(v)) / 2 if v else 0.0

    def cell(self, key, metric):
        """``mean ± half-range`` in % (one seed: the mean alone; none: "-")."""
        v = self.values(key, metric)
        if not v:
            return "-"
        m = 100 * statistics.fmean(v)
        return f"{m:.1f}" if len(v) == 1 else f"{m:.1f} ± {100 * self.spread(key, metric):.1f}"

    def count(self, key, metric):
        """A count (weights) as ``mean ± half-range`` with thousands separators; equal seeds: the mean."""
        v = self.values(key, metric)
        if not v:
            return "-"
        m = statistics.fmean(v)
        return f"{m:,.0f}" if max(v) == min(v) else f"{m:,.0f} ± {(max(v) - min(v)) / 2:,.0f}"


def pct(x):
    """A fraction in % with one decimal, "-" for None."""
    return "-" if x is None else f"{100 * x:.1f}"


def diff(a, b):
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- findings

@dataclass(frozen=True)
class Section:
    verdict: str
    lines: list  # the section's lines in RESULTS.md
    headline: str = ""  # the key numbers, for the summary at the top of RESULTS.md


@dataclass(frozen=True)
class Finding:
    """One claim tested by a sweep. ``key``: the spec section whose presence asks for its cells;
    ``plan(spec, cells)`` adds them to a ``Cells``; ``section(summary, out)`` -> ``Section``
    (writing its files under ``out`` where it has any). A finding with ``stem`` has its own sweep
    (``sweep``: its spec's name) and its section and notes under ``docs/results/<stem>*.md``."""
    number: int
    title: str
    key: str
    plan: Callable
    section: Callable
    stem: Optional[str] = None
    sweep: Optional[str] = None


class Cells:
    """A plan being built: ``add`` a cell once; a cell that several findings add (a pretrained
    model they share) runs once and serves them all."""

    def __init__(self):
        self.cells = []

    def add(self, cid, finding, kind, seed, meta, steps, ckpt, deps=()):
        same = next((c for c in self.cells if c["id"] == cid), None)
        if same:
            same["finding"] += [f for f in finding if f not in same["finding"]]
        else:
            self.cells.append({"id": cid, "finding": list(finding), "kind": kind, "seed": seed, "meta": meta,
                               "steps": steps, "ckpt": ckpt, "deps": list(deps)})


# --------------------------------------------------------------------------- files and command line

def read_summary(path, command=None):
    """A sweep's ``summary.json``, checked: a missing, damaged or foreign file is a ``UserError``
    naming it and the command that writes it (``command``, default: the sweep that made it)."""
    make = command or "python experiments/sweep.py --spec <its spec> --out <its folder>"
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; make it with: {make}")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable summary ({type(e).__name__}); rerun the sweep to rewrite it: {make}")
    if not isinstance(summary, dict) or not isinstance(summary.get("cells"), list) \
            or not isinstance(summary.get("spec"), dict):
        raise UserError(f"{path}: not a sweep summary (no spec and cells); rerun the sweep to rewrite it: {make}")
    return summary


def write_section(summary, out, stem, plot_fn, section_fn):
    """Write ``<out>/<stem>.png`` (``plot_fn``), the section ``<out>/results/<stem>.md`` and its rows
    ``<out>/results/<stem>.json`` (``section_fn``); return the section's text."""
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    plot_fn(summary, os.path.join(out, f"{stem}.png"))
    text, rs = section_fn(summary, f"{stem}.png")
    with open(os.path.join(out, "results", f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results", f"{stem}.json"), "w") as f:
        json.dump(rs, f, indent=1)
    return text


def cli(write_fn, stem, description, argv=None, modes=()):
    """``--summary`` (default runs/experiments/<stem>/summary.json) -> ``write_fn`` into ``--out``,
    or the function of the first ``modes`` flag given ((flag, help, fn(summary, out)) each). A
    missing or damaged summary is one line, exit 2."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--summary", default=f"runs/experiments/{stem}/summary.json")
    p.add_argument("--out", default="docs", help="folder for the plot; the section goes to <out>/results/")
    for flag, text, _ in modes:
        p.add_argument(flag, action="store_true", help=text)
    a = p.parse_args(argv)
    fn = next((f for flag, _, f in modes if getattr(a, flag[2:].replace("-", "_"))), write_fn)

    def run():
        summary = read_summary(a.summary, f"python experiments/sweep.py --spec experiments/{stem}.yaml")
        print(fn(summary, a.out))
        return 0
    return run_cli(run)
