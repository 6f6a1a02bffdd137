"""The L2 cache of a CPU core, as Linux reports it: what the passes of an eager CPU step over a tensor stay within."""

from __future__ import annotations

import functools
from pathlib import Path

from lmlab.core.threads import most_threads

CPU0 = Path("/sys/devices/system/cpu/cpu0/cache")
UNKNOWN_L2 = 2**20  # where the system does not say (macOS, a container without /sys): a common core's L2


@functools.cache
def l2_bytes(folder: Path = CPU0) -> int:
    """Bytes of one core's L2 cache (cpu0's: the cores of a job alike), or UNKNOWN_L2 where `folder` does not say."""
    for index in sorted(folder.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KM")) * {"K": 2**10, "M": 2**20}.get(size[-1], 1)
        except (OSError, ValueError):
            break
    return UNKNOWN_L2


@functools.cache
def job_l2() -> int:
    """The L2 caches of the cores a job may use, read once a process: not of its threads now, which a load may lower,
    so that what is sized to them (an eager CPU step's loss chunks) and the bits it computes stay the same."""
    return l2_bytes() * most_threads()[0]
