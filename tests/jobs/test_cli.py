"""The rollcast CLI: real help for every command, clear errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import COMMANDS
from tests.support import rollcast


def test_top_level_help_lists_every_command() -> None:
    r = rollcast("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_help(command: str) -> None:
    r = rollcast(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"rollcast {command}" in r.stdout
    # the description is the module docstring, i.e. what the command really does
    first_line = __import__(COMMANDS[command], fromlist=["_"]).__doc__.strip().splitlines()[0]
    assert first_line.split()[0] in r.stdout


def test_unknown_setting_and_wrong_type_are_named_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[kafka]\nbootstrap_srvers = "x"\n[window]\nlength_ms = "an hour"\n')
    r = rollcast("--config", str(cfg), "replay", "temperature_hourly.csv")
    assert r.returncode == 2
    assert "kafka.bootstrap_srvers: unknown setting" in r.stderr
    assert "window.length_ms" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    env = {"ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9", "ROLLCAST_KAFKA__CONNECT_TIMEOUT_S": "2",
           "ROLLCAST_DATA_DIR": str(tmp_path)}
    r = rollcast("replay", "temperature_hourly.csv", "--limit", "10", env=env)
    assert r.returncode == 1
    assert "kafka.bootstrap_servers" in r.stderr and "127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_broker_configured_and_none_running_says_what_to_do(tmp_path: Path) -> None:
    r = rollcast("replay", "temperature_hourly.csv", env={"ROLLCAST_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "rollcast up" in r.stderr and "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS" in r.stderr


def test_the_collector_is_off_during_start_up_and_back_on_after() -> None:
    """A rollcast process imports with the garbage collector off; it comes back on when the forecast job
    freezes its start-up heap, and by a timer in any case."""
    import subprocess
    import sys

    script = (
        "import gc, time\n"
        "from jobs.cli import collector_off_during_start_up\n"
        "from pipeline.runtime import freeze_heap\n"
        "collector_off_during_start_up(0.3)\n"
        "assert not gc.isenabled()\n"
        "time.sleep(1.0)\n"
        "assert gc.isenabled(), 'the timer did not turn it on'\n"
        "collector_off_during_start_up(60)\n"
        "assert not gc.isenabled()\n"
        "assert freeze_heap() > 0 and gc.isenabled(), 'freeze_heap did not turn it on'\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
