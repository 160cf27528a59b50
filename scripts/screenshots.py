#!/usr/bin/env python3
"""Regenerate the console's screenshots in docs/screenshots/ (one command: ``.venv/bin/python scripts/screenshots.py``).

It runs the browser tests (tests/test_console_browser.py and tests/test_console_jobs_browser.py: the
real service, real devices, Debian's chromium through Playwright) with ``FLEETCMD_SCREENSHOTS``
pointing at docs/screenshots, so the committed pictures are what the tests saw; the tests must pass
for the pictures to be replaced.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "screenshots"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fleetcmd-shots-") as tmp:
        env = {**os.environ, "FLEETCMD_SCREENSHOTS": tmp}
        tests = ["tests/test_console_browser.py", "tests/test_console_jobs_browser.py"]
        argv = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"]
        done = subprocess.run(argv, cwd=ROOT, env=env, check=False)
        if done.returncode != 0:
            print("screenshots: the browser tests failed; docs/screenshots is unchanged", file=sys.stderr)
            return done.returncode
        TARGET.mkdir(parents=True, exist_ok=True)
        for old in TARGET.glob("*.png"):
            old.unlink()
        shots = sorted(Path(tmp).glob("*.png"))
        for shot in shots:
            (TARGET / shot.name).write_bytes(shot.read_bytes())
    print(f"screenshots: {len(shots)} PNGs in {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
