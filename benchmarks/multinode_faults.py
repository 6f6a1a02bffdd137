"""The table of multi-node faults: each fault tests/test_multinode.py injects into a torchrun job over two test
hosts (network namespaces joined by a veth pair; root only), what happened, how long it took to be said, what was
lost and where the run that went on ended against the uninterrupted one.

    sudo .venv/bin/python benchmarks/multinode_faults.py

Runs the tests (each asserts what its row says, nothing about time) and gathers the row each prints. The
times depend on the machine's load: the load is printed under the table.
"""

from __future__ import annotations

import os
import subprocess
import sys

from rich.table import Table

from lmlab.commands.common import console  # wide tables when piped to a file
from lmlab.core.busy import LoadMeter, busy_warning

COLUMNS = ("fault", "what happened", "time to detect", "what was lost", "the run that went on, at its end")


def main() -> None:
    with LoadMeter() as meter:
        done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_multinode.py", "-q", "-rP", "-p",
                               "no:cacheprovider"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [line.split(" | ")[1:] for line in done.stdout.splitlines() if line.startswith("FAULT | ")]
    if done.returncode or not rows:
        sys.exit(f"the tests did not pass (status {done.returncode}):\n{done.stdout[-3000:]}")
    table = Table(*COLUMNS, title="torchrun over two hosts: faults")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(busy_warning("this table", meter.load, "its times read high") or
                  "the machine was quiet while the faults were timed")


if __name__ == "__main__":
    main()
