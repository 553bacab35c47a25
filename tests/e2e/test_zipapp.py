"""dist/campaignd, the single-file build: built by tools/build_zipapp.py, run
by a bare Python (no packages, nothing of this clone on its path, a clean
environment), it checks a config and runs the whole demo, children included."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.test_demo import processes_mentioning
from tests.e2e.test_demo import summary_of
from tests.helpers import require

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "build_zipapp.py"


@pytest.fixture(autouse=True)
def _shiv():
    # shiv is in the [test] extra, so CI has it: fail there rather than skip.
    require(
        importlib.util.find_spec("shiv") is not None,
        "tools/build_zipapp.py needs shiv (pip install shiv)",
    )


@pytest.fixture
def workdir():
    # Short on purpose: the demo's status socket path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="czip-"))
    yield path
    for proc in processes_mentioning(str(path)):
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def bare_python(where: Path) -> Path:
    """A venv without pip or any package: the "machine with only Python"."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)],
        check=True,
        timeout=60,
    )
    return where / "bin"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_zipapp_runs_check_config_and_the_demo_on_a_bare_python(workdir):
    app = workdir / "dist" / "campaignd"
    build = subprocess.run(
        [sys.executable, str(BUILD), "--output", str(app)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert app.stat().st_mode & 0o111, "the zipapp is not executable"

    bin_dir = bare_python(workdir / "python")
    shiv_root = workdir / "shiv"
    home = workdir / "home"
    home.mkdir()
    (workdir / "tmp").mkdir()
    env = {
        # The shebang (/usr/bin/env python3) finds the bare interpreter.
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "SHIV_ROOT": str(shiv_root),
        "TMPDIR": str(workdir / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    # Nothing of ours is importable without the zipapp.
    probe = subprocess.run(
        ["python3", "-c", "import daemon"], env=env, cwd=workdir, capture_output=True
    )
    assert probe.returncode != 0, "the bare Python imports daemon on its own"

    check = subprocess.run(
        [str(app), "check-config"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "[daemon]" in check.stdout and "[scheduler]" in check.stdout
    # Extracted under SHIV_ROOT, never in the home directory.
    assert list(shiv_root.glob("campaignd_*/site-packages/psutil"))
    assert not (home / ".shiv").exists()

    demo = subprocess.run(
        [str(app), "demo", "--contacts", "20"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = demo.stdout[-3000:] + demo.stderr[-3000:]
    assert demo.returncode == 0, output
    summary = summary_of(demo.stdout)
    assert summary.get("campaign status") == "completed", output
    assert int(summary["replies -> Message 2 sent"]) > 0, output
    assert processes_mentioning(str(workdir)) == []
