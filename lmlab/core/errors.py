"""The errors lmlab says in its own words: `UserError` (one sentence, exit 2), `PeerLost`, `Stopped`; and
`classify`, the one place that tells other libraries' failures apart (torch's, Gloo's, NCCL's) by their type and
words."""

from __future__ import annotations

import sys

MOST_CHARACTERS = 2_000  # of a refusal: its longest sentences, which list valid keys or a budget's parts, are shorter


class UserError(Exception):
    """Bad input from the user: the message is one sentence naming the file or field and the fix.

    The CLI prints it and exits with status 2; nothing on disk is left half-written. The Python API raises it, and
    IPython (a notebook, Colab) shows its sentence alone, not a traceback through lmlab: a mistake of the input,
    not of the code (`_render_traceback_`, which IPython asks an exception for).

    The one place a value quoted in a refusal is cut short: a sentence past MOST_CHARACTERS (one that quotes a
    setting of a megabyte) keeps its start and its end, the fix, around a count of what was left out.
    """

    def __init__(self, message: str = ""):
        if len(message) > MOST_CHARACTERS:
            head, tail = message[:MOST_CHARACTERS // 2], message[-MOST_CHARACTERS // 4:]
            message = f"{head}[... {len(message) - len(head) - len(tail):,} characters ...]{tail}"
        super().__init__(message)

    def _render_traceback_(self) -> list[str]:
        return [f"UserError: {self}"]


class PeerLost(UserError):
    """A torchrun job's collective failed because another of its processes ended or stopped answering: said by
    the rank that saw it, since the process that speaks for its node may be the one gone."""


class Stopped(KeyboardInterrupt):
    """A stop signal ended a command before it wrote anything: its one line, said as an interruption (status
    130), which a notebook's cell shows as stopped."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


# How Gloo and NCCL say, in a collective, that a peer process went away (it died, or its launcher stopped it).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited", "Socket Timeout")


def classify(err: BaseException) -> str | None:
    """What failed, for the failures lmlab says in a sentence: "memory" (the host or a device's allocator ran out),
    "overflow" (a size too large for the arithmetic that counts it), "timeout" (a torchrun collective waited past
    train.collective_timeout), "peer" (a collective's other process went away), or None (anything else)."""
    text = str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return "memory"
    dist = sys.modules.get("torch.distributed")  # loaded by any job that has collectives
    collective = (dist is not None and isinstance(err, getattr(dist, "DistError", ()))
                  or isinstance(err, RuntimeError) and ("gloo" in text or any(words in text for words in PEER_GONE)))
    if collective:
        return "timeout" if "timed out" in text.lower() else "peer"
    return "overflow" if "overflow" in text.lower() else None
