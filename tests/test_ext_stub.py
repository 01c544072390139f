"""The committed xcsave/_ext.pyi matches the built extension."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ext_stub_is_fresh() -> None:
    r = subprocess.run(
        [sys.executable, "-P", str(ROOT / "tools" / "gen-ext-stub"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
