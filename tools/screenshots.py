"""Regenerate the console screenshots of the README (docs/img/console-*.png).

    .venv/bin/python tools/screenshots.py            # into docs/img/
    .venv/bin/python tools/screenshots.py --out DIR

Runs the browser test tests/e2e/test_console.py (a real `campaignd run`, the
fake provider, headless Chromium) with CAMPAIGND_SCREENSHOTS set: the test
saves each page it has checked against the database. A missing Chromium is
an error here, not a skip. Needs the test extra and Debian's `chromium` and
`chromium-driver`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    env = dict(
        os.environ,
        CAMPAIGND_SCREENSHOTS=str(args.out.resolve()),
        CAMPAIGND_TEST_REQUIRE_SERVICES="1",
    )
    test = "tests/e2e/test_console.py"
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env,
    )
    if code == 0:
        for png in sorted(args.out.glob("console-*.png")):
            print(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    return code


if __name__ == "__main__":
    sys.exit(main())
