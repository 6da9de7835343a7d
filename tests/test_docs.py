"""The documented commands, as a reader copies them. Every command in a fenced block of README.md
and docs/*.md is read out (through bash, so loops, variables and quotes expand as they would):

- its script exists, and its flags parse with the script's own argparse;
- its ``--config`` exists, and its ``--set`` overrides load (``config.load_config``: real keys,
  valid values), with a ``--stage`` the config has;
- every file it reads (``--ckpt``, ``--init``, a stage's previous checkpoint, ``--resume``'s
  folder, ``--summary``, ...) was written before it: by an earlier command of the page, in
  order, or by the Quickstart; and it does not stop on what an earlier one wrote (a run folder
  or export already there, without ``--overwrite`` or ``--resume``);
- the cheap ones run for real: a synopsis (``[--flag ...]``) against ``--help``, and
  ``--dry-run``.

A command that needs a GPU, the internet or SLURM carries a visible mark in the docs, a comment
``# needs: gpu`` (or ``internet``, ``slurm``; on a comment line of its own it covers the commands
below it up to the next blank line). Such a command is still checked, never run: its run test is
skipped, naming the mark. The last test prints how many commands were checked, run and skipped.
"""
import functools
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import forkserver
from helpers import ROOT, script_env

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S*\s+)*(?:python|torchrun|pip)\s|^\s*for\s")
MARK = re.compile(r"#.*\bneeds:\s*([a-z, ]+)")
SYNOPSIS = re.compile(r"\s\[--")
TRAINING = ("main.py", "adv_main.py")

# bash stands in for the programs: each records its argv and the line it was called from.
SHIM = r"""
_rec() { local line=$1; shift; printf '%s\x1f' "$line" "$@"; printf '\x1e'; }
python() { _rec "${BASH_LINENO[0]}" python "$@"; }
torchrun() { _rec "${BASH_LINENO[0]}" torchrun "$@"; }
pip() { _rec "${BASH_LINENO[0]}" pip "$@"; }
"""


# --------------------------------------------------------------------------- reading the docs

def blocks(page):
    """[(first line number, language, [lines])] of the fenced blocks of ``page``."""
    out, cur = [], None
    for n, line in enumerate(open(os.path.join(ROOT, page)).read().split("\n"), 1):
        if line.startswith("```"):
            if cur is None:
                cur = (n + 1, line[3:].strip(), [])
            else:
                out.append(cur)
                cur = None
        elif cur is not None:
            cur[2].append(line)
    return out


def marks(lines):
    """{line index: set of marks} for each line of a block: a mark on a command's own lines (with
    its continuations), or on a comment line above it in the same paragraph."""
    out, inherited = {}, set()
    for i, line in enumerate(lines):
        if not line.strip():
            inherited = set()
            continue
        m = MARK.search(line)
        own = {x.strip() for x in m.group(1).split(",") if x.strip()} if m else set()
        if line.lstrip().startswith("#"):
            inherited |= own
        out[i] = inherited | own
    # a command continued over several lines (a trailing backslash) shares its lines' marks
    i = 0
    while i < len(lines):
        j = i
        while lines[j].rstrip().endswith("\\") and j + 1 < len(lines):
            j += 1
        allm = set().union(*(out.get(k, set()) for k in range(i, j + 1)))
        for k in range(i, j + 1):
            out[k] = allm
        i = j + 1
    return out


def command_blocks(page):
    """[(block index, first line, lines, synopsis)] of the blocks of ``page`` that hold commands."""
    out = []
    for b, (start, lang, lines) in enumerate(blocks(page)):
        first = next((x for x in lines if x.strip() and not x.lstrip().startswith("#")), "")
        if lang in ("", "bash", "sh") and COMMAND.match(first):
            out.append((b, start, lines, bool(SYNOPSIS.search(first))))
    return out


def commands():
    """Every command of the docs: dicts with page, line, block, argv (after bash), marks, synopsis
    (the flags a synopsis names). One bash reads every block, each in a subshell of its own."""
    found, script, where = [], SHIM.split("\n"), {}
    for page in PAGES:
        for b, start, lines, synopsis in command_blocks(page):
            mk = marks(lines)
            if synopsis:  # a synopsis: its flags, checked against --help
                found.append({"page": page, "line": start, "block": b, "argv": lines[0].split(), "marks": mk.get(0, set()),
                              "synopsis": re.findall(r"--[a-z][a-z0-9-]*", " ".join(lines))})
                continue
            script.append("(")
            for i in range(len(lines)):
                where[len(script) + 1 + i] = (page, b, start, i, mk.get(i, set()))
            script += lines + [")"]
    proc = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"a block is not valid shell: {proc.stderr}"
    for rec in proc.stdout.split("\x1e")[:-1]:
        line, *argv = rec.split("\x1f")[:-1]
        page, b, start, i, mk = where[int(line)]
        found.append({"page": page, "line": start + i, "block": b, "argv": argv, "marks": mk, "synopsis": None})
    order = {p: k for k, p in enumerate(PAGES)}
    return sorted(found, key=lambda c: (order[c["page"]], c["block"]))  # stable: a block's commands as bash ran them


def script_of(argv):
    """(script, its arguments) of a recorded command: ``python X.py a b`` -> (X.py, [a, b])."""
    if argv[0] == "pip":
        return "pip", argv[1:]
    if argv[0] == "torchrun":
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        return rest[0], rest[1:]
    if argv[1] == "-m":
        return "-m " + argv[2], argv[3:]
    return argv[1], argv[2:]


@functools.lru_cache(maxsize=None)
def all_commands():
    out, seen = commands(), {}
    for c in out:  # a command in a loop is found once per pass: #2, #3, ...
        c["script"], c["args"] = script_of(c["argv"])
        c["id"] = f"{c['page']}:{c['line']} {c['script']}"
        seen[c["id"]] = seen.get(c["id"], 0) + 1
        c["id"] += f" #{seen[c['id']]}" if seen[c["id"]] > 1 else ""
    return out


# --------------------------------------------------------------------------- flags and configs, in one process

# Run in a fresh interpreter, so the scripts' imports and logging stay out of the test process:
# argparse's parse is stopped right after it succeeds, the script never starts its work.
PARSER = r"""
import argparse, json, os, runpy, sys
sys.path[:0] = [os.getcwd(), os.getcwd()]  # [0]: the script's folder, set per script below

class Parsed(BaseException):
    pass

real = argparse.ArgumentParser.parse_known_args
def parse_known_args(self, args=None, namespace=None):
    ns, rest = real(self, args, namespace)
    if self.add_help and not rest:  # the script's own parser, not a helper's partial one
        raise Parsed(ns)
    return ns, rest
argparse.ArgumentParser.parse_known_args = parse_known_args

from common import UserError
from config import load_config
from pruning.plan import stage_names
from training import rundir
from training.rundir import default_out

rundir.exit_if_busy = lambda argv: None  # a run folder in use by a real run is not the command's fault

results = []
for script, args in json.load(sys.stdin):
    res = {"ok": False}
    src = open(script).read()
    if not any(w in src for w in ("ArgumentParser", "cli(", "training.command")):  # no parser: do not run it
        res = {"ok": not args, "error": "takes no arguments", "args": {}}
        results.append(res)
        continue
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as python <script> sets it
    try:
        runpy.run_path(script, run_name="__main__")
        res["error"] = "the script ran past its argument parsing"
    except Parsed as p:
        ns = vars(p.args[0])
        plain = (str, int, float, bool, list, type(None))
        res = {"ok": True, "args": {k: v if isinstance(v, plain) else getattr(v, "name", str(v)) for k, v in ns.items()}}
        try:
            if ns.get("config") and "overrides" in ns:
                cfg = load_config(ns["config"], ns["overrides"])
                if "stage" in ns:  # a training command (eval.py and export.py take --config too)
                    res["stages"] = stage_names(cfg)
                    res["out"] = ns.get("out") or default_out(ns["config"])
                    if ns["stage"] not in ("all", *res["stages"]):
                        raise UserError(f"--stage {ns['stage']}: the config's stages are {res['stages']}")
            elif ns.get("config"):
                load_config(ns["config"], [])
        except (UserError, OSError) as e:
            res = {"ok": False, "error": f"config: {e}"}
    except UserError as e:
        res["error"] = str(e)
    except SystemExit as e:
        res["error"] = f"argparse exited {e.code}"
    except Exception as e:  # noqa: BLE001 - an import that fails is the finding
        res["error"] = f"{type(e).__name__}: {e}"
    results.append(res)
sys.stdout.write("\n@@RESULTS@@" + json.dumps(results))
"""


@functools.lru_cache(maxsize=None)
def parsed():
    """{command id: the parse result} of every command that runs one of the project's scripts."""
    todo = [c for c in all_commands() if c["script"].endswith(".py") and os.path.isfile(os.path.join(ROOT, c["script"]))
            and not c["synopsis"]]
    proc = forkserver.run([sys.executable, "-c", PARSER], input=json.dumps([[c["script"], c["args"]] for c in todo]),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert "@@RESULTS@@" in proc.stdout, proc.stderr[-3000:]
    return dict(zip([c["id"] for c in todo], json.loads(proc.stdout.split("@@RESULTS@@")[1])))


# --------------------------------------------------------------------------- what a command reads and writes

def norm(p):
    return os.path.normpath(p) if p else p


def files(c, res):
    """(reads, writes, checkpoints it refuses to replace) of a parsed command: paths, and folders
    ending in '/' for everything under them."""
    a, s = res.get("args", {}), c["script"]
    reads, writes, guarded = [], [], []
    if s in TRAINING:
        out, stages = norm(res["out"]), res["stages"]
        run = stages if a["stage"] == "all" else [a["stage"]]
        if a.get("init"):
            reads.append(norm(a["init"]))
        elif a["resume"]:
            reads.append(out + "/")
        elif run[0] != stages[0]:
            reads.append(os.path.join(out, stages[stages.index(run[0]) - 1] + ".pt"))
        writes += [os.path.join(out, f"{st}.pt") for st in run] + [os.path.join(out, f) for f in
                                                                     ("eval.json", "metrics.jsonl", "log.txt", "config.yaml")]
        if not (a["resume"] or a["overwrite"]):
            guarded = [os.path.join(out, f"{st}.pt") for st in run]
    elif s == "eval.py":
        reads.append(norm(a["ckpt"]))
        writes += [norm(a["json"])] if a.get("json") else []
    elif s == "export.py":
        reads.append(norm(a["ckpt"]))
        fmt = a.get("format") or ""
        suffix = {"safetensors": ".export.safetensors", "onnx": ".export.onnx"}.get(str(fmt), ".export.pt")
        out = norm(a.get("out") or os.path.splitext(a["ckpt"])[0] + suffix)
        writes.append(out)
        guarded = [] if a.get("overwrite") else [out]
    elif s == "tblog.py":
        reads.append(os.path.join(norm(a["run"]), "metrics.jsonl"))
    elif s == "experiments/sweep.py" and not a.get("dry_run"):
        name = "quick" if a.get("quick") else os.path.splitext(os.path.basename(a["spec"]))[0]
        writes.append(norm(a.get("out") or os.path.join("runs", "experiments", name)) + "/")
    elif s.startswith(("experiments/", "bench/")) and a.get("summary"):
        reads.append(norm(os.path.relpath(a["summary"], ROOT) if os.path.isabs(a["summary"]) else a["summary"]))
    return reads, writes, guarded


def written(path, done):
    """Whether ``path`` was written by a command in ``done`` or is committed (a stored record)."""
    return path in done or any(d.endswith("/") and (path + "/").startswith(d) for d in done) or path in tracked()


@functools.lru_cache(maxsize=None)
def tracked():
    return frozenset(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())


@functools.lru_cache(maxsize=None)
def quickstart_writes():
    qs = [c for c in all_commands() if c["page"] == "README.md" and c["script"] in TRAINING][0]
    assert parsed()[qs["id"]]["ok"], parsed()[qs["id"]]
    return tuple(files(qs, parsed()[qs["id"]])[1]), qs["id"]


# --------------------------------------------------------------------------- the tests

def ids(cs):
    return [c["id"] for c in cs]


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_checks(page):
    """Script, flags, config and files of each command of ``page``, the page read in order after
    the Quickstart."""
    results = parsed()
    qs_writes, qs_id = quickstart_writes()
    done, problems = set(qs_writes), []
    for c in [c for c in all_commands() if c["page"] == page]:
        s = c["script"]
        if s == "pip":
            reqs = [c["args"][i + 1] for i, x in enumerate(c["args"]) if x == "-r"]
            problems += [f"{c['id']}: no {r}" for r in reqs if not os.path.isfile(os.path.join(ROOT, r))]
            continue
        if s.startswith("-m "):
            __import__(s[3:])
            continue
        if not os.path.isfile(os.path.join(ROOT, s)):
            problems.append(f"{c['id']}: no script {s}")
            continue
        if c["synopsis"]:
            continue  # test_synopses_name_real_flags
        res = results[c["id"]]
        if not res["ok"]:
            problems.append(f"{c['id']}: {res['error']}")
            continue
        reads, writes, guarded = files(c, res)
        if c["id"] != qs_id:  # a command marked internet may read what the user downloads
            problems += [f"{c['id']}: reads {r}, which no earlier command of the page (or the Quickstart) wrote"
                         for r in reads if not written(r, done) and "internet" not in c["marks"]]
            problems += [f"{c['id']}: {g} already exists (written before), so this command stops; give it its own "
                         f"--out (or --overwrite / --resume)" for g in guarded if g in done]
        done |= set(writes)
    assert not problems, "\n" + "\n".join(problems)


def test_the_docs_have_commands_and_a_quickstart():
    cs = all_commands()
    assert len(cs) > 50 and {c["page"] for c in cs} >= {"README.md", "docs/training.md", "docs/reproduction.md"}
    assert quickstart_writes()[1].startswith("README.md:") and "runs/demo/retrain.pt" in quickstart_writes()[0]
    known = {"gpu", "internet", "slurm"}
    assert [c["id"] for c in cs if c["marks"] - known] == []


def runnable(c):
    return c["synopsis"] is not None or "--dry-run" in c["args"] or "--help" in c["args"]


def first_passes():
    """Each command line of the docs once (a loop's first pass)."""
    return [c for c in all_commands() if " #" not in c["id"]]


RUNS = [c for c in first_passes() if runnable(c) or c["marks"]]


@pytest.mark.parametrize("cmd", RUNS, ids=ids(RUNS))
def test_command_runs(cmd):
    """The cheap commands, for real: a synopsis's flags are all in the script's --help; a
    --dry-run exits 0 (and the example cell of docs/RESULTS.md is what the dry run prints)."""
    if cmd["marks"]:
        pytest.skip(f"needs: {', '.join(sorted(cmd['marks']))} (marked in {cmd['page']})")
    args = ["--help"] if cmd["synopsis"] else cmd["args"]
    proc = forkserver.run([sys.executable, cmd["script"], *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    if cmd["synopsis"]:
        assert [f for f in cmd["synopsis"] if f not in proc.stdout] == []
    if cmd["script"] == "experiments/sweep.py" and "experiments/paper_findings.yaml" in " ".join(cmd["args"]):
        printed = {re.sub(r"^\S*python[\d.]*\s", "python ", line.strip()).replace(ROOT + os.sep, "")
                   for line in proc.stdout.splitlines()}
        example = [c for c in all_commands() if c["page"] == "docs/RESULTS.md" and "--stage" in c["args"]
                   or c["page"] == "docs/RESULTS.md" and c["script"] == "eval.py"]
        assert example and [" ".join(c["argv"]) for c in example if " ".join(c["argv"]) not in printed] == []


def test_zz_counts(record_property):
    """The closing count: conftest.py prints it at the end of the session (``docs_counts``)."""
    cs, lines = all_commands(), first_passes()
    marked = [c for c in lines if c["marks"]]
    by = {}
    for c in marked:
        by[", ".join(sorted(c["marks"]))] = by.get(", ".join(sorted(c["marks"])), 0) + 1
    line = (f"docs commands: {len(cs)} checked ({len(lines)} lines in the docs, loops expanded), {len([c for c in lines if runnable(c) and not c['marks']])} run, "
            f"{len(marked)} lines skipped by mark ({', '.join(f'{n} {m}' for m, n in sorted(by.items())) or 'none'})")
    record_property("docs_counts", line)
    assert len(cs) == len({c["id"] for c in cs})  # one id each, so each check names its command
