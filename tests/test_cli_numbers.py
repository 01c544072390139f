"""No tracebacks on bad numbers (issue 15, item 2): every number is checked
where it is parsed, and the error names the option; the API names the
parameter (never the extension's TypeError); Ctrl-C while a command starts
is the one line every interrupted command prints."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import xcsave_cli

from xcsave import _ext, defaults, sim


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["sim", "create", "d", "--memory", "99999999999999999999G"], "--memory", "at most 64G"),
        (["sim", "create", "d", "--memory", "100T"], "--memory", "at most 64G"),
        (["sim", "create", "d", "--memory", "4097"], "--memory", "multiple of 4096"),
        (["sim", "create", "d", "--memory", "0"], "--memory", "at least 4K"),
        (["sim", "create", "d", "--memory", "4M", "--seed", "-1"], "--seed", "from 0 to"),
        (["sim", "create", "d", "--memory", "4M", "--seed", str(1 << 64)], "--seed", "from 0"),
        (["sim", "create", "d", "--memory", "4M", "--vcpus", "-1"], "--vcpus", "from 1 to 128"),
        (["sim", "create", "d", "--memory", "4M", "--vcpus", "0"], "--vcpus", "from 1 to 128"),
        (["sim", "create", "d", "--memory", "4M", "--vcpus", "x"], "--vcpus", "not a whole"),
        (["sim", "dirty", "d", "--rate", "-5", "--duration", "1"], "--rate", "from 0 to"),
        (["sim", "dirty", "d", "--rate", "5", "--duration", "-1"], "--duration", "more than 0"),
        (["sim", "dirty", "d", "--rate", "5", "--duration", "nan"], "--duration", "more than 0"),
        (["save", "--sim", "d", "o", "--copy-threads", "0"], "--copy-threads", "from 1 to 64"),
        (["save", "--domid", "-3", "o"], "--domid", "from 0 to 32751"),
        (["save", "--sim", "d", "o", "--timeout", "-1"], "--timeout", "more than 0"),
        (["demo", "--memory", "1T"], "--memory", "at most 64G"),
    ],
)
def test_bad_numbers_name_the_option(
    args: list[str], option: str, says: str, tmp_path: Path, sim_env: dict[str, str]
) -> None:
    env = sim_env
    r = xcsave_cli(*args, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"argument {option}: " in last and says in last, last
    assert not (tmp_path / "sim" / "d").exists()


def test_the_api_names_the_parameter(tmp_path: Path) -> None:
    dom = tmp_path / "d"
    with pytest.raises(ValueError, match="seed must be from 0 to"):
        sim.create(dom, 1 << 20, seed=-1)
    with pytest.raises(ValueError, match="vcpus must be from 1 to 128"):
        sim.create(dom, 1 << 20, vcpus=0)
    with pytest.raises(ValueError, match="memory must be a multiple of 4096"):
        sim.create(dom, 100 << 40)
    with pytest.raises(TypeError, match="vcpus must be an int"):
        sim.create(dom, 1 << 20, vcpus=1.5)  # type: ignore[arg-type]
    assert not dom.exists()
    sim.create(dom, 1 << 20)
    with pytest.raises(ValueError, match="rate must be at least 0"):
        sim.dirty(dom, -5, 1.0)
    with pytest.raises(ValueError, match="duration must be"):
        sim.dirty(dom, 5, float("inf"))


def test_limits_agree_with_the_extension() -> None:
    assert defaults.SIM_MAX_VCPUS == _ext.SIM_MAX_VCPUS
    assert defaults.SIM_MAX_MEMORY == _ext.SIM_MAX_PAGES * defaults.PAGE_SIZE


def test_ctrl_c_while_starting_is_one_line(sim_env: dict[str, str]) -> None:
    """SIGINT at moments spread over a command's start (imports, parsers, the
    helper's spawn): never a traceback, whatever it interrupts."""
    env = sim_env
    assert xcsave_cli("sim", "create", "d", "--memory", "4M", env=env).returncode == 0
    argv = [sys.executable, "-P", "-m", "xcsave", "sim", "dirty", "d", "--rate", "10"]
    for delay in (0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.6):
        proc = subprocess.Popen(
            [*argv, "--duration", "2"], stderr=subprocess.PIPE, env=env, text=True
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if "Fatal Python error: init_" in err:
            continue  # the interpreter's own initialization, before any code of ours runs
        assert "Traceback" not in err, (delay, err)
        # -SIGINT: before Python's own handler (the default action); 0: the
        # workload stopped at the signal and said what it wrote; 130: stopped
        # while starting or running, in one line.
        assert proc.returncode in (-signal.SIGINT, 0, 130), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.strip().endswith("interrupted"), (delay, err)
