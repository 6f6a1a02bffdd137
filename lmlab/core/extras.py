"""The optional packages some commands use (pyproject.toml's extras), and the one sentence that refuses a command
whose package is missing, with the pip command that installs it here.

`pip install -e .` installs lmlab without them: the venv `make demo` builds holds the serve and gguf extras the
README's tour uses, and every other command that needs one says so in this sentence (status 2), before it loads
anything, never in a traceback (`lmlab.commands.main` turns an import of one of these modules that fails late
into the same sentence)."""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmlab.core.errors import UserError
from lmlab.core.jsontext import parse_json

# The module a command imports: (the extra of pyproject.toml that installs it, or None; the package pip installs).
OPTIONAL: dict[str, tuple[str | None, str]] = {
    "fastapi": ("serve", "fastapi"), "starlette": ("serve", "fastapi"), "uvicorn": ("serve", "uvicorn"),
    "prometheus_client": ("serve", "prometheus_client"),
    "gguf": ("gguf", "gguf"),
    "openai": ("judge", "openai"),
    "pyarrow": ("data", "pyarrow"), "tiktoken": ("data", "tiktoken"),
    "tensorboard": ("track", "tensorboard"),
    "wandb": (None, "wandb"), "datasets": (None, "datasets"),
}
SERVE = ("fastapi", "uvicorn", "prometheus_client")


def missing(*modules: str) -> list[str]:
    """The `modules` that do not import here."""
    gone = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            gone.append(module)
    return gone


def require(*modules: str, user: str, otherwise: str = "") -> None:
    """Refuse, in one sentence, what `user` names (`lmlab serve`, `reading x.parquet`) when a module of `modules`
    does not import; `otherwise`: another way out, said after the pip command (`, or set train.tracker = "none"`)."""
    if gone := missing(*modules):
        raise UserError(refusal(user, gone, otherwise))


def refusal(user: str, modules: list[str], otherwise: str = "") -> str:
    """E.g. "lmlab serve needs fastapi and prometheus_client, which are not installed; install them with `pip
    install -e '.[serve]'`." """
    packages = list(dict.fromkeys(OPTIONAL.get(m, (None, m))[1] for m in modules))
    names = " and ".join([", ".join(packages[:-1]), packages[-1]] if len(packages) > 1 else packages)
    which = "which is" if len(packages) == 1 else "which are"
    return (f"{user} needs {names}, {which} not installed; install {'it' if len(packages) == 1 else 'them'} with "
            f"`{install_command(modules)}`{otherwise}.")


def install_command(modules: list[str]) -> str:
    """The pip command that installs `modules` for the lmlab running here: its extras (`pip install -e '.[serve]'`
    from the checkout it was installed from, `pip install 'lmlab[serve]'` for an installed one), else the packages;
    this interpreter's pip (`.venv/bin/python -m pip` when the `pip` on PATH is another Python's)."""
    extras = list(dict.fromkeys(e for m in modules if m in OPTIONAL and (e := OPTIONAL[m][0])))
    installed = _installed_lmlab() if extras else None
    named = [m for m in modules if not (installed and m in OPTIONAL and OPTIONAL[m][0])]
    words = list(dict.fromkeys(OPTIONAL.get(m, (None, m))[1] for m in named))
    if installed == "lmlab":
        words.insert(0, shlex.quote(f"lmlab[{','.join(extras)}]"))
    elif installed:  # an editable install: its checkout, with the extras
        words[:0] = ["-e", shlex.quote(f"{installed}[{','.join(extras)}]")]
    return " ".join([_pip(), "install", *words])


def _installed_lmlab() -> str | None:
    """`lmlab` for an installed copy, the checkout's folder ('.' when it is the working directory) for an editable
    one, None when the lmlab running is not the one pip installed (a source tree on PYTHONPATH, with or without
    the egg-info a build left in it)."""
    try:
        dist = distribution("lmlab")
    except PackageNotFoundError:
        return None
    if not dist.read_text("INSTALLER"):  # metadata no installer wrote: a build's leftover in a source tree
        return None
    running = Path(str(sys.modules["lmlab"].__file__)).resolve().parent
    url = parse_json(dist.read_text("direct_url.json") or "{}")
    if not url.get("dir_info", {}).get("editable"):
        return "lmlab" if running == Path(str(dist.locate_file("lmlab"))).resolve() else None
    folder = Path(unquote(urlparse(url["url"]).path)).resolve()
    if running != folder / "lmlab":
        return None
    return "." if folder == Path.cwd().resolve() else _shown(folder)


def _pip() -> str:
    """`pip` when the one on PATH is this interpreter's, else this interpreter's `-m pip`."""
    here = Path(sys.executable).parent
    found = shutil.which("pip")
    if found and Path(found).parent.resolve() == here.resolve():
        return "pip"
    return f"{shlex.quote(_shown(Path(sys.executable)))} -m pip"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
