"""What a packager or a type checker reads: one version, the license, py.typed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib

import daemon
from tests.helpers import subprocess_env


def _pyproject(request) -> dict:
    with open(request.config.rootpath / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_version_is_written_once_and_printed_by_the_cli(request):
    project = _pyproject(request)
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "daemon.__version__"
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{daemon.__version__}\n"
    assert importlib.metadata.version("campaignd") == daemon.__version__


def test_license_metadata_is_pep_639(request):
    project = _pyproject(request)["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (request.config.rootpath / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 campaignd authors\n")
    # setuptools reads PEP 639 metadata from 77 on.
    assert _pyproject(request)["build-system"]["requires"] == ["setuptools>=77"]


def test_py_typed_is_shipped(request):
    assert (request.config.rootpath / "daemon" / "py.typed").is_file()
    package_data = _pyproject(request)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["daemon"]


def test_the_postgres_extra_named_by_the_driver_error_exists(request):
    extras = _pyproject(request)["project"]["optional-dependencies"]
    assert any(dep.startswith("psycopg") for dep in extras["postgres"])
