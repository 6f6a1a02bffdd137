"""Imports run one way, as docs/ARCHITECTURE.md draws the layers: no module imports one of a higher layer, no
two modules import each other through any path, serving a model never loads the trainer, and no function is longer
than a screen."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lmlab
from lmlab.commands import EXAMPLES

PACKAGE = Path(lmlab.__file__).parent

# docs/ARCHITECTURE.md's layers, lowest first: each unit of the package (a subpackage whole, or __main__) imports
# only units of its own layer or below, so the tree shows the layers. A new subpackage gets its row here and in the map.
LAYERS = [
    {"core"},                                            # errors, files, progress; config, device, peak
    {"model"},                                           # the model kinds and their interface
    {"data"},                                            # corpora, tokenizers, prepare, shards, the loader
    {"run"},                                             # the run folder: its files, checkpoints, prompts
    {"inference", "analysis"},                           # decoding a loaded run; runs read back as tables and plots
    {"train", "evals"},                                  # training and fine-tuning; evaluating, tasks, judging
    {"hf", "gguf", "serving", "experiments", "writeup"},  # what a command does, built from the layers below
    {"api"},                                             # lmlab.train, lmlab.Run, ...: what the commands call
    {"commands", "__main__"},                            # parse, call the API and the library, print
]
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every lmlab module and the lmlab modules it imports anywhere in its body (lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m.startswith("lmlab")}
    graph["lmlab"] |= set(lmlab.API.values())  # the package's names, each imported from its module at first use
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else "lmlab"


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.slow
def test_no_module_imports_a_layer_above_its_own():
    units = {unit(m) for m in imports()} - {"lmlab"}
    assert units <= set(LAYER), f"units missing from LAYERS (and the map): {sorted(units - set(LAYER))}"
    upward = [f"{m} imports {d}" for m, deps in imports().items() for d in deps
              if unit(m) != "lmlab" and unit(d) != "lmlab" and LAYER[unit(d)] > LAYER[unit(m)]]
    assert upward == []


@pytest.mark.slow
def test_no_import_cycles_between_modules_or_subpackages():
    modules = imports()
    assert cycle(modules) is None, " -> ".join(cycle(modules))
    units: dict[str, set[str]] = {}
    for m, deps in modules.items():
        units.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    units.pop("lmlab", None)  # the package's __init__: the version, and the API's names imported lazily
    assert cycle(units) is None, " -> ".join(cycle(units))


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
def test_sampling_and_serving_load_neither_the_trainer_nor_fsdp_nor_matplotlib():
    code = ("import sys, lmlab.inference.generate, lmlab.serving.app; "
            "print(' '.join(m for m in ('lmlab.train.loop', 'torch.distributed.fsdp', 'matplotlib') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


LONGEST_FUNCTION = 70  # lines, decorators left out; the style asks for functions short enough to see whole


@pytest.mark.slow
def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, long


LONGEST_MODULE = 450  # lines; past it a module holds more than one concern, and the style asks for small modules
# Each module's allowance (tests/module_lines.json): its lines when the cap was set, or since lowered. A change may
# lower an allowance, never raise it, so a module near its cap is split or trimmed, never its documentation cut to
# fit; one that shrank by more than ALLOWANCE_SLACK lines has its allowance lowered with it, so the cap follows what
# the code reached, and a new module comes with its own.
ALLOWANCES = Path(__file__).parent / "module_lines.json"
ALLOWANCE_SLACK = 10


def test_no_module_is_longer_than_its_allowance_and_each_allowance_follows_its_module():
    allowed = json.loads(ALLOWANCES.read_text(encoding="utf-8"))
    lines = {str(path.relative_to(PACKAGE.parent)): len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted(PACKAGE.rglob("*.py"))}
    wrong = [f"{name}: {n} lines, over its allowance of {allowed[name]}" for name, n in lines.items()
             if name in allowed and n > allowed[name]]
    wrong += [f"{name}: {n} lines, {allowed[name] - n} under its allowance: lower it to {n}"
              for name, n in lines.items() if name in allowed and allowed[name] - n > ALLOWANCE_SLACK]
    wrong += [f"{name}: a new module of {n} lines: give it its allowance" for name, n in lines.items()
              if name not in allowed]
    wrong += [f"{name}: no such module: drop its allowance" for name in allowed if name not in lines]
    wrong += [f"{name}: its allowance {n} passes {LONGEST_MODULE}" for name, n in allowed.items() if n > LONGEST_MODULE]
    assert not wrong, wrong


@pytest.mark.slow
def test_import_lmlab_names_the_api_without_loading_torch():
    """The command line imports the package first, and the server's app opens its port before torch loads: the
    API's names are imported at their first use."""
    code = ("import sys, lmlab; names = sorted(set(lmlab.__all__) - set(dir(lmlab))); "
            "print('torch' in sys.modules, names, lmlab.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "[]", lmlab.__version__]
    # The training loop's package, imported first by its full name, does not hide the function lmlab.train.
    code = "import lmlab.train.loop, lmlab; print(lmlab.train.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["lmlab.api.training"]
    assert lmlab.Run.__module__ == "lmlab.api.run" and set(lmlab.API) <= set(lmlab.__all__)


# Each command line runs in one fresh interpreter, in this order; after each, whether torch is loaded: the first that
# loads it is named. `{run}`: a trained run, its folder's parent `{runs}`.
READ_ONLY = [["--help"], ["--version"], *([*name.split(), "--help"] for name in EXAMPLES), ["runs", "{runs}"],
             ["runs", "{runs}", "--wide"], ["runs", "{runs}", "--json"], ["runs", "{empty}"], ["log", "{run}"],
             ["log", "{run}", "--wide"], ["log", "{run}", "--json"], ["log", "{run}", "--csv"],
             ["compare", "{run}", "{run}"], ["compare", "{run}", "{run}", "--json"]]


@pytest.mark.slow
def test_the_commands_that_only_read_runs_never_import_torch(tiny_run, tmp_path):
    """`lmlab runs`, `log` without a plot, `compare` without samples and every --help answer in a fraction of a
    second: torch (1-2 s to import) is loaded only by what computes."""
    lines = [[arg.format(run=tiny_run, runs=tiny_run.parent, empty=tmp_path) for arg in line] for line in READ_ONLY]
    code = ("import contextlib, io, json, sys\nfrom lmlab.commands import main\nloaded = []\n"
            "for line in json.loads(sys.argv[1]):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(line)\n"
            "    loaded.append('torch' in sys.modules)\n"
            "print(json.dumps(loaded))")
    job = subprocess.run([sys.executable, "-c", code, json.dumps(lines)], capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    loaded = json.loads(job.stdout.splitlines()[-1])
    assert True not in loaded, f"`lmlab {' '.join(lines[loaded.index(True)])}` imported torch"


def test_mypy_checks_every_module():
    """mypy reads the whole package and no override excuses a module from it: a new module is typed, never exempt."""
    mypy = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert "lmlab" in mypy["files"] and "exclude" not in mypy, "mypy must read the whole package"
    excused = [override["module"] for override in mypy.get("overrides", [])
               if override.get("ignore_errors") or override.get("disable_error_code")
               or override.get("follow_imports") and "lmlab" in str(override["module"])]
    assert not excused, f"pyproject.toml excuses {excused} from mypy; type them instead"
