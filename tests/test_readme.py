"""The README runs as written (issue 15): its first Python example (a
simulated domain: no Xen needed) runs to the end, and every `xcsave ...`
command it lists parses (--help)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_first_python_example_runs(tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    env = dict(os.environ, XCSAVE_SIM_DIR=str(tmp_path / "sim"))
    env["XCSAVE_LOCK_DIR"] = str(tmp_path / "locks")
    r = subprocess.run(
        [sys.executable, "-P", "-c", example],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "Stats(" in r.stdout and "RestoreStats(" in r.stdout


def test_set_up_is_two_commands() -> None:
    """A fresh machine needs exactly two: the main job on the simulated
    default, and the tests (a usage synopsis once crept into the first)."""
    text = README.read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```\n(.*?)```", section, re.S)]
    assert blocks == ["pip install . && xcsave demo", "tools/test"], blocks


def test_every_listed_command_has_help() -> None:
    commands = set()
    blocks = re.findall(r"```\n(.*?)```", README.read_text(), re.S)  # the shell blocks
    for line in "\n".join(blocks).splitlines():
        m = re.match(r"xcsave ((?:sim |tls |bench )?[a-z][a-z-]+)", line)
        if m and not m.group(1).endswith("-"):
            commands.add(tuple(m.group(1).split()))
    for words in sorted(commands):
        r = subprocess.run(
            [sys.executable, "-P", "-m", "xcsave", *words, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, (words, r.stderr)
