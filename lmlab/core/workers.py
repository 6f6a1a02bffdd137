"""How lmlab starts a Python worker of its own (the chat-template sandbox, the server's compiler): `python -I`, which
puts neither the working directory nor PYTHON* variables nor the user's site-packages on the worker's path, given
this process's own path explicitly, less the working directory.

Started as `python -m MODULE`, a worker searched the folder the command was started from first: a `jinja2.py`
left in it ran inside the sandbox, in place of Jinja. Given this process's path, the worker imports what this process
would (lmlab from the same tree, PYTHONPATH's folders, the same site-packages) and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Takes the path it is given, in its order, and runs the module as `python -m` would.
_BOOT = ("import json, runpy, sys; module, path = sys.argv[1], json.loads(sys.argv[2]); del sys.argv[1:3]; "
         "sys.path[:] = path + [p for p in sys.path if p not in path]; runpy.run_module(module, run_name='__main__', "
         "alter_sys=True)")


def python_command(module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args...` isolated from the working directory."""
    return [sys.executable, "-I", "-c", _BOOT, module, json.dumps(worker_path()), *args]


def worker_path() -> list[str]:
    """This process's sys.path without the folder Python put first because it was started there (`''`, or the
    working directory itself for `python -m`), nor `''` anywhere; folders named on purpose (PYTHONPATH) stay, even
    the working directory. lmlab's own folder, where it was found only there (a checkout run as `python -m lmlab`
    from its root), goes last."""
    path = list(sys.path)
    if path and not sys.flags.safe_path and (not path[0] or os.path.realpath(path[0]) == os.path.realpath(".")):
        path = path[1:]
    path = [p for p in path if p]
    root = str(Path(__file__).resolve().parents[2])  # the folder lmlab/ is in
    if not any(os.path.realpath(p) == root for p in path):
        path.append(root)
    return path
