"""Where `make test`'s time goes, in CPU seconds: each test's own process and the processes it started, so a test that
waits on a server or a child is charged for what they computed, and a busy machine changes the figures little (wall
time follows the load; CPU time mostly does not).

    python benchmarks/suite_cpu.py [--top 40] [PYTEST ARGS ...]     # default: the tests `make test` runs

Runs pytest on two xdist workers as `make test` does, with a plugin that reads each test's CPU time (its worker's
threads, and the children it waited for, resource.getrusage) from setup to teardown, and when it began and ended.
Prints the test files and the tests that cost most, the tail (the tests still running once a worker had none
left), the CPU seconds of the whole run, and its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = '''
import json, os, resource, time

import pytest

OUT = os.environ["SUITE_CPU_OUT"]


def _cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (own, children), began = _cpu(), time.time()
    yield
    own_after, children_after = _cpu()
    with open(f"{OUT}/{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps({"test": item.nodeid, "own": own_after - own, "children": children_after - children,
                              "worker": os.getpid(), "began": began, "ended": time.time()}) + "\\n")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=40, help="the tests listed (default: 40)")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "suite_cpu_plugin.py").write_text(PLUGIN, encoding="utf-8")
        out = Path(scratch) / "out"
        out.mkdir()
        env = {**os.environ, "SUITE_CPU_OUT": str(out),
               "PYTHONPATH": os.pathsep.join(filter(None, [scratch, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "suite_cpu_plugin", "-p", "no:cacheprovider",
                   *(pytest_args or ["-m", "not serial", "-n", "2", "--dist", "worksteal"])]
        started, started_at, before = time.perf_counter(), time.time(), os.times()
        done = subprocess.run(command, cwd=ROOT, env=env)
        wall, after = time.perf_counter() - started, os.times()
        rows = [json.loads(line) for path in out.glob("*.jsonl") for line in path.read_text().splitlines()]
    by_test = {r["test"]: r["own"] + r["children"] for r in rows}
    by_file: Counter[str] = Counter()
    for test, seconds in by_test.items():
        by_file[test.split("::")[0]] += seconds
    files = Table(title="CPU seconds by test file (the test's process and the children it waited for)")
    for column in ("file", "CPU s", "share"):
        files.add_column(column, justify="left" if column == "file" else "right")
    total = sum(by_test.values())
    for name, seconds in by_file.most_common(args.top):
        files.add_row(name, f"{seconds:.1f}", f"{100 * seconds / total:.1f}%")
    tests = Table(title=f"the {args.top} tests that cost most")
    for column in ("test", "CPU s"):
        tests.add_column(column, justify="left" if column == "test" else "right")
    for name, seconds in Counter(by_test).most_common(args.top):
        tests.add_row(escape(name), f"{seconds:.1f}")  # a parameter id in brackets is no markup
    console.print(files, tests, *([tail(rows, started_at)] if rows else []))  # no tests ran: no tail
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    console.print(f"{len(by_test)} tests: {total:,.0f} CPU s charged to tests; pytest and everything it started "
                  f"{cpu:,.0f} CPU s in {wall:,.0f} s of wall time ({cpu / wall:.2f} cores busy on average); "
                  f"pytest exited {done.returncode}")
    sys.exit(done.returncode)


def tail(rows: list[dict], started_at: float) -> Table:
    """When each worker ran its last test: a worker that ends early leaves a core idle to the suite's end, and the
    tests the other ran meanwhile are the ones to start sooner (or shorten)."""
    ends = {w: max(r["ended"] for r in rows if r["worker"] == w) for w in {r["worker"] for r in rows}}
    first = min(ends.values())
    table = Table(title=f"the tail: one worker idle for the last {max(ends.values()) - first:.0f} s, while these ran")
    for column in ("test", "began at s", "wall s"):
        table.add_column(column, justify="left" if column == "test" else "right")
    for r in sorted((r for r in rows if r["ended"] > first), key=lambda r: r["began"]):
        table.add_row(escape(r["test"]), f"{r['began'] - started_at:.0f}", f"{r['ended'] - r['began']:.1f}")
    return table


if __name__ == "__main__":
    main()
