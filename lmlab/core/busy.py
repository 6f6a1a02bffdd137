"""Whether the machine was busy while something was measured: the CPU time others took on this process's cores
(psutil's per-CPU times), not the load average, which lags and counts this process's own threads; and how long this
process has run (what a time budget counts from)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

from lmlab.core.errors import UserError

# Others' share of the cores above which a measurement is busy: a kernel on every core waits for its slowest thread.
BUSY_SHARE = 0.1
MIN_WINDOW = 0.25  # seconds: a shorter window's load is a handful of clock ticks, too few to tell busy from quiet
# A CPU's times that are no work, or counted twice (Linux counts a guest's time in user's too).
NOT_WORK = {"idle", "iowait", "guest", "guest_nice"}


@dataclass(frozen=True)
class Load:
    """What else used the machine during a window: `others`, the share of this process's cores others took (None
    where it cannot be read); `loadavg`, the one-minute load average."""

    seconds: float
    cores: int
    others: float | None
    loadavg: float | None

    @property
    def busy(self) -> bool:
        """Others took more than BUSY_SHARE of the cores; where that is unknown, the load average exceeds them."""
        return self.others > BUSY_SHARE if self.others is not None else (self.loadavg or 0) > self.cores

    def describe(self) -> str:
        used = ("other processes' CPU use unknown" if self.others is None else
                f"other processes used {100 * self.others:.0f}% of the {self.cores} core{'s' * (self.cores > 1)}")
        return used + ("" if self.loadavg is None else f", load average {self.loadavg:.2f}")

    def record(self) -> dict[str, float | int | None]:
        return {"seconds": round(self.seconds, 3), "cores": self.cores,
                "others": None if self.others is None else round(self.others, 4), "loadavg": self.loadavg}

    @staticmethod
    def recorded(record: Any) -> bool:
        """Whether `record` is a `record()` as a measurement writes it (what a kept one must be to be read back)."""
        return (isinstance(record, dict) and set(record) == {"seconds", "cores", "others", "loadavg"}
                and all(v is None or type(v) in (int, float) and 0 <= v < math.inf for v in record.values())
                and (record["others"] or 0) <= 1)


def busy_warning(what: str, load: Load | None, effect: str) -> str | None:
    """The warning for a figure measured while the machine was busy (`what` was timed, with `effect`); None if
    quiet."""
    if load is None or not load.busy:
        return None
    return f"warning: the machine was busy while it timed {what} ({load.describe()}): {effect}"


def cores() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def check_threads(name: str, threads: int, fix: str = "0 to let lmlab choose") -> None:
    """Refuse more threads than cores: past them a job only waits on itself, and OpenMP aborts on too many."""
    available = len(cores())
    if threads > available:
        raise UserError(f"{name} is {threads:,}, more than the {available} core{'s' * (available > 1)} this process "
                        f"may use; set it to at most {available}, or {fix}.")


# Thread pool sizes of torch (OpenMP) and `tokenizers` (rayon), each pool started whole at its first parallel call.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS")
_C_SPACE = " \t\n\v\f\r"  # what C's isspace() skips, where Python's str.strip() would skip more
_ULONG = 2**64  # C's unsigned long and Rust's usize hold less, on the 64-bit hosts torch runs on


def _decimal(digits: str) -> int | None:
    """ASCII decimal digits as a number below _ULONG; None for anything else (int() would take more)."""
    if not (digits.isascii() and digits.isdigit()) or len(digits.lstrip("0")) > len(str(_ULONG)):
        return None
    return int(digits) if int(digits) < _ULONG else None


def _strtoul(field: str) -> int | None:
    """A count as libgomp reads one: C spaces, a sign and digits (strtoul's: a '-' wraps around), C spaces; None
    where it refuses it (no digits, out of range, 0, or above a long)."""
    body = field.strip(_C_SPACE)
    sign, digits = (body[0], body[1:]) if body[:1] in ("+", "-") else ("", body)
    value = _decimal(digits)
    value = -value % _ULONG if value is not None and sign == "-" else value
    return value if value is not None and 0 < value < _ULONG // 2 else None


def _openmp_threads() -> tuple[str, int] | None:
    """OMP_NUM_THREADS and the count of torch's OpenMP pool, as libgomp reads it: a list of counts, one a nesting
    level, the first the pool's; None where it is unset or libgomp refuses it (and keeps its default)."""
    counts = [_strtoul(field) for field in os.environ.get("OMP_NUM_THREADS", "").split(",")]
    return ("OMP_NUM_THREADS", counts[0]) if counts[0] and all(counts) else None


def _rayon_threads() -> tuple[str, int] | None:
    """The variable that sizes rayon's pool (the tokenizers library's) and its count, as rayon-core reads them with
    Rust's usize::from_str (a '+' and digits, nothing around them): RAYON_NUM_THREADS where it parses (0: the
    cores), else RAYON_RS_NUM_CPUS; None where neither sets a count."""
    for name in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        text = os.environ.get(name, "")
        count = _decimal(text[1:] if text.startswith("+") else text)
        if count is not None:
            return (name, count) if count else None
    return None


def env_pools() -> dict[str, int]:
    """The variable that sizes each pool of THREAD_VARIABLES' (OpenMP's, rayon's) and its count, read as the pool's
    library reads them; a pool left to its library's default is not in it."""
    return dict(setting for setting in (_openmp_threads(), _rayon_threads()) if setting)


def env_threads() -> int | None:
    """OMP_NUM_THREADS's count as OpenMP reads it, or None; a pool the environment sizes above the cores is refused
    first."""
    pools = env_pools()
    for name, count in pools.items():
        check_threads(name, count, "unset it to let lmlab choose")
    return pools.get("OMP_NUM_THREADS")


def _busy_seconds(cpus: list[int]) -> float | None:
    """Seconds of work (all processes) on `cpus` since boot; None where the system does not say."""
    try:
        times = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError):
        return None
    if max(cpus) >= len(times):
        return None
    return sum(v for c in cpus for k, v in times[c]._asdict().items() if k not in NOT_WORK)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants (a benchmark's servers are its work, not another's)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += sum(process.cpu_times()[:4])  # user, system, and its waited-for children's
        except psutil.Error:  # gone meanwhile
            continue
    return total


def loadavg() -> float | None:
    try:
        return round(psutil.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class LoadMeter:
    """Measures the load of a window: `with LoadMeter() as meter: ...`, then `meter.load`."""

    def __enter__(self) -> LoadMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LoadMeter:
        self.cpus = cores()
        self.load: Load | None = None
        self._avg_before = loadavg()
        self._busy, self._own, self._started = _busy_seconds(self.cpus), _own_cpu_seconds(), time.perf_counter()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def stop(self) -> Load:
        seconds = time.perf_counter() - self._started
        busy, own = _busy_seconds(self.cpus), _own_cpu_seconds() - self._own
        others = None
        if busy is not None and self._busy is not None and seconds > 0:
            others = min(1.0, max(0.0, (busy - self._busy - own) / (len(self.cpus) * seconds)))
        # without the CPUs' times, the average from before this process's own work is the fairer one
        self.load = Load(seconds, len(self.cpus), others, self._avg_before if others is None else loadavg())
        return self.load


def process_age() -> float:
    """Seconds since this process started, so a budget counts the interpreter's start too; 0.0 where unknown."""
    try:
        return max(0.0, time.time() - psutil.Process().create_time())
    except psutil.Error:
        return 0.0
