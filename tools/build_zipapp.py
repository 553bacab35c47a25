"""Build dist/campaignd: one executable file holding campaignd and its dependencies.

    .venv/bin/python tools/build_zipapp.py            # -> dist/campaignd
    dist/campaignd demo                               # needs only python3 >= 3.11

The file is a shiv zipapp. By default it is built offline from what is already
installed in the interpreter running this script (the versions the tests ran
with): the project's `daemon` package from this clone, plus every runtime
dependency in pyproject.toml (and the `postgres` extra when installed), copied
file by file from site-packages. `--from-index` asks pip instead (PyPI, or
whatever PIP_INDEX_URL / PIP_FIND_LINKS say).

At its first run the zipapp extracts its site-packages to ~/.shiv, or to
$SHIV_ROOT when set (a systemd unit must set it: ProtectHome hides ~). It puts
that directory on PYTHONPATH, so the children the supervisor execs as
`python -m daemon child ROLE` import the same code. Compiled dependencies
(psutil is abi3, so any CPython >= 3.11) load from there; falcon's and
psycopg-binary's compiled modules match the building Python's minor version
only (falcon falls back to pure Python, psycopg to the system libpq).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare `pip install -e .` venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT = "daemon.cli:main"
MIN_PYTHON = (3, 11)
# Run by the zipapp before the entry point: without it an old Python fails
# with "module 'daemon' has no attribute 'cli'" (tomllib is missing).
PREAMBLE = f"""\
import sys

if sys.version_info < {MIN_PYTHON!r}:
    sys.exit(
        "campaignd needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later, not "
        + sys.version.split()[0] + " (" + sys.executable + ")"
    )
"""
SHEBANG = "/usr/bin/env python3"
SKIPPED_PARTS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}


class BuildError(Exception):
    """A build step failed; the message says what to do."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    try:
        _require_shiv()
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        with tempfile.TemporaryDirectory(prefix="campaignd-zipapp-") as tmp:
            site = Path(tmp) / "site-packages"
            site.mkdir()
            _copy_project(project, site)
            requirements = _requirements(project, args.no_postgres)
            if args.from_index:
                _pip_install(requirements, site)
            else:
                _copy_installed(requirements, site)
            output = Path(args.output).resolve()
            output.parent.mkdir(parents=True, exist_ok=True)
            preamble = Path(tmp) / "check_python.py"
            preamble.write_text(PREAMBLE)
            _run_shiv(site, output, args.python, preamble)
    except BuildError as exc:
        print(f"build_zipapp: error: {exc}", file=sys.stderr)
        return 1
    size_mb = output.stat().st_size / 1e6
    elapsed = time.monotonic() - started
    print(f"built {output} ({size_mb:.1f} MB) in {elapsed:.1f} s")
    print(f"try it: {_shown(output)} demo --contacts 50")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o", "--output", default=str(ROOT / "dist" / "campaignd"), help="output file"
    )
    parser.add_argument(
        "--python", default=SHEBANG, help=f"shebang interpreter (default: {SHEBANG})"
    )
    parser.add_argument(
        "--from-index",
        action="store_true",
        help="resolve dependencies with pip instead of copying the installed ones",
    )
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="leave out psycopg (embedded mode and Redis queues only)",
    )
    return parser


def _require_shiv() -> None:
    try:
        import shiv  # noqa: F401
    except ImportError:
        raise BuildError(
            f"shiv is not installed: {sys.executable} -m pip install shiv"
        ) from None


def _requirements(project: dict, no_postgres: bool) -> list[Requirement]:
    """The runtime requirements: dependencies, plus `postgres` when usable."""
    names = list(project["dependencies"])
    if not no_postgres:
        postgres = project.get("optional-dependencies", {}).get("postgres", [])
        # Optional: a build environment without psycopg still builds a zipapp
        # for embedded mode and Redis queues.
        names += [r for r in postgres if _installed(Requirement(r).name)]
    return [Requirement(r) for r in names]


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _copy_project(project: dict, site: Path) -> None:
    """The daemon package from this clone, and a dist-info naming its version."""
    shutil.copytree(
        ROOT / "daemon",
        site / "daemon",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"),
    )
    name, version = project["name"], _project_version()
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(
        f"[console_scripts]\ncampaignd = {ENTRY_POINT}\n"
    )


def _project_version() -> str:
    text = (ROOT / "daemon" / "__init__.py").read_text()
    match = re.search(r"^__version__ = \"([^\"]+)\"", text, re.MULTILINE)
    if match is None:
        raise BuildError('daemon/__init__.py: no __version__ = "..." line')
    return match[1]


def _copy_installed(requirements: list[Requirement], site: Path) -> None:
    """Copy each required distribution, and theirs, from this interpreter."""
    seen: set[str] = set()
    pending = [(r, ()) for r in requirements]
    while pending:
        requirement, via = pending.pop()
        key = canonicalize_name(requirement.name)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            chain = " <- ".join((requirement.name, *via)) or requirement.name
            raise BuildError(
                f"{chain} is not installed in {sys.executable}: install the "
                "project (pip install -e .) or build with --from-index"
            ) from None
        _copy_distribution(dist, site)
        for extra in requirement.extras or {""}:
            for dependency in _dependencies(dist, extra):
                pending.append((dependency, (requirement.name, *via)))


def _dependencies(dist: metadata.Distribution, extra: str) -> list[Requirement]:
    out = []
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or marker.evaluate({"extra": extra}):
            out.append(requirement)
    return out


def _copy_distribution(dist: metadata.Distribution, site: Path) -> None:
    files = dist.files
    if not files:
        raise BuildError(f"{dist.metadata['Name']}: installed without a file list")
    base = Path(dist.locate_file("")).resolve()
    for entry in files:
        source = Path(dist.locate_file(entry)).resolve()
        # RECORD also lists console scripts (../../../bin/...): not ours.
        if not source.is_relative_to(base) or not source.is_file():
            continue
        relative = source.relative_to(base)
        if SKIPPED_PARTS & set(relative.parts) or source.suffix in SKIPPED_SUFFIXES:
            continue
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _pip_install(requirements: list[Requirement], site: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile"]
    command += ["--target", str(site), *(str(r) for r in requirements)]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise BuildError(f"pip install failed (exit {result.returncode})")


def _run_shiv(site: Path, output: Path, python: str, preamble: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "shiv",
        "--site-packages",
        str(site),
        "--entry-point",
        ENTRY_POINT,
        "--output-file",
        str(output),
        "--python",
        python,
        # Children are exec'ed as `python -m daemon child ROLE`: they find
        # the extracted packages through PYTHONPATH.
        "--extend-pythonpath",
        "--preamble",
        str(preamble),
        "--compressed",
        # Same inputs, same bytes: the build id (a hash of the contents)
        # names the extraction dir, so an upgrade never reuses a stale one.
        "--reproducible",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"shiv failed: {result.stderr.strip() or result.stdout}")


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
