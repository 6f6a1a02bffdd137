"""The CUDA tests `make gpu-report` runs (benchmarks/gpu_report.py): every test marked `cuda` in tests/, found by its
marker, those of the CUDA paths a GPU user meets first, in a process group stopped whole at its cap; what they
decided before a crash or the cap is kept."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from lmlab.commands.common import console

ROOT = Path(__file__).resolve().parent.parent
Row = tuple[str, str, str]
WHY = "why"  # the key a failed test's first line of failure is kept under, beside its recorded properties

# The CUDA paths a GPU user meets, each found among the CUDA tests by the words its test's name holds (not the name
# itself: tests are renamed as the code under them changes); their tests run first, and each path is a row.
CUDA_PATHS = {
    "graph decode": ("cuda_graph", "decod"),
    "graphs in training": ("cuda_graph", "train"),
    "on-device skip": ("skips", "non_finite"),
    "FSDP with per-block compile": ("fsdp", "compile"),
    "fp16 scaler resume": ("fp16", "scaler", "resume"),
}


def cuda_tests_found(tests: Path = ROOT / "tests") -> list[str]:
    """The node ids of the tests marked `cuda` (by a decorator, or by their module's pytestmark) in the test files of
    `tests`, those of CUDA_PATHS first, in its order."""
    found = []
    for path in sorted(tests.glob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        if "mark.cuda" not in text:
            continue
        tree = ast.parse(text)
        whole = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                    and "mark.cuda" in ast.unparse(node.value) for node in tree.body)
        found += [f"{path.relative_to(tests.parent)}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
                  and (whole or any("mark.cuda" in ast.unparse(d) for d in node.decorator_list))]
    paths = list(CUDA_PATHS)
    return sorted(found, key=lambda test: next((paths.index(p) for p in on_paths(test)), len(paths)))


def on_paths(test: str) -> list[str]:
    """The CUDA paths whose words the name of `test` (a node id, or a name with its parameters) holds."""
    name = test.split("::")[-1].split("[")[0].lower()
    return [path for path, words in CUDA_PATHS.items() if all(word in name for word in words)]


def cuda_tests(results: dict[str, tuple[str, dict[str, str]]], tests: list[str], seconds: float) -> Row:
    """Run the CUDA tests `tests` (node ids) in a process group stopped whole at `seconds`; each test's outcome and
    what it recorded (the gaps its tolerances bound) go into `results`, for the checklist. A test that crashes the
    process (a segfault in a kernel or a compiled library), or that the cap stops, is named, and the outcomes
    before it are kept."""
    started, what = time.perf_counter(), f"CUDA tests ({', '.join(sorted({t.split('::')[0] for t in tests}))})"
    if not tests:  # pytest would collect the whole suite
        return what, "none found: no test in tests/ is marked cuda", "all pass"
    with tempfile.TemporaryDirectory() as scratch:
        xml = Path(scratch) / "cuda.xml"
        done = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
                                 f"--junitxml={xml}", "-o", "junit_family=xunit1", *tests], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = done.communicate(timeout=seconds)
            capped = False
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)  # pytest and what it started: torchrun's workers
            (stdout, stderr), capped = done.communicate(), True
        if xml.exists() and not capped:
            for case in ElementTree.parse(xml).iter("testcase"):
                verdict = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
                outcome = "passed" if verdict is None else verdict.tag
                recorded = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
                if verdict is not None and outcome != "skipped":  # why, in a line: a lease has no time to rerun for it
                    recorded[WHY] = (verdict.get("message") or "no message").splitlines()[0][:300]
                results[case.get("name", "")] = outcome.replace("failure", "failed"), recorded
    took = f"in {time.perf_counter() - started:.0f} s"
    if done.returncode not in (0, 5) and not capped:  # 5: nothing collected
        # pytest's faulthandler prints every thread then a long module list: the crashing thread's stack is the clue
        crashed_in = re.search(r"^Current thread.*?(?=\n\n|\Z)", stderr, re.M | re.S)
        console.print(stdout[-4000:], crashed_in.group(0) if crashed_in else stderr[-2000:], markup=False)
    if done.returncode < 0:  # killed: no summary line and no XML, only the lines -v printed
        lines = re.findall(r"^\S+::(\w+(?:\[[^\]]*\])?)(?: (PASSED|FAILED|SKIPPED|ERROR))?", stdout, re.M)
        stopped = next((name for name, outcome in reversed(lines) if not outcome), "a test")
        killer = "" if capped else signal.Signals(-done.returncode).name
        unfinished = "stopped at the cap" if capped else f"crashed ({killer})"
        for name, outcome in lines:
            results[name] = (outcome.lower() if outcome else unfinished), {}
        counts = ", ".join(f"{n} {o.lower()}" for o in ("PASSED", "FAILED", "SKIPPED", "ERROR")
                           if (n := sum(outcome == o for _, outcome in lines)))
        why = f"the {seconds:.0f} s cap stopped {stopped}" if capped else f"{stopped} crashed the process ({killer})"
        return what, f"{counts or 'none decided'}, then {why} {took}", "all pass"
    summary = (stdout.strip().splitlines() or ["no output"])[-1]
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|errors?)", summary)) or summary
    return what, f"{counts} {took}", "all pass"
