"""The layout's rules, read from the source: the library's modules import only from their own layer
or the layers below it, with no import circle; modules and functions stay short; the commands
and the paper's modules are the only Python files at the top (README, Layout)."""
import ast
import os
import subprocess
from helpers import ROOT


# Lowest first. A module may import from its own layer and the ones before it.
LAYERS = [
    ["common"],
    ["data", "admm", "attacks", "models"],
    ["training"],  # its library: distributed, losses, methods, state, rundir, tensorboard
    ["pruning"],
    ["evaluation"],
    ["deploy"],
    ["training.loop", "training.command", "config", "configs"],  # configs/schema.py: the keys
    ["main", "adv_main", "eval", "export", "tblog"],
]
COMMANDS = LAYERS[-1]
TOP = ["admm", "attacks", "common", "config", "data"]  # the library modules kept at the top


def library_files():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [f for f in files if not f.startswith(("tests/", "experiments/", "bench/"))]


def module_of(path):
    mod = path[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def layer_of(mod):
    """Index in LAYERS of the longest entry that is ``mod`` or a package above it."""
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    return None if best is None else best[0]


def imports(path, known):
    """The project's modules that ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph():
    files = library_files()
    known = {module_of(f) for f in files}
    return {module_of(f): imports(f, known) - {module_of(f)} for f in files}


def test_every_library_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def test_no_import_from_a_higher_layer():
    up = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
          for m, deps in graph().items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert up == []


def test_no_import_circle():
    g, state, circles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for f in library_files():
        src = open(os.path.join(ROOT, f)).read()
        if src.count("\n") > 400:
            long_modules.append(f)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{f}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_modules == [] and long_functions == []


def test_only_the_commands_and_the_papers_modules_at_the_top():
    top = sorted(f[:-3] for f in library_files() if "/" not in f)
    assert top == sorted(COMMANDS + TOP) and len(top) <= 10


def test_every_script_a_test_starts_gets_the_fixed_environment():
    """A test's subprocess that runs Python (``sys.executable``, not ``git`` or ``mount``) passes
    ``env=`` (``helpers.script_env``), so ``OMP_NUM_THREADS`` and the other variables that change
    results never come from the caller's shell."""
    bare = []
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not f.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, "tests", f)).read())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("run", "Popen") and getattr(node.func.value, "id", "") in ("subprocess", "forkserver")):
                continue
            first = node.args[0] if node.args else None
            external = isinstance(first, ast.List) and first.elts and isinstance(first.elts[0], ast.Constant)
            if not external and not any(k.arg == "env" for k in node.keywords):
                bare.append(f"{f}:{node.lineno}")
    assert bare == []
