"""The command line: help, config, and a clear exit on a bad setting."""

from __future__ import annotations

from conftest import CommandRunner


def test_help_lists_the_commands(run_cli: CommandRunner) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("worker", "monitor", "capacity", "demo", "emulator", "config", "db"):
        assert command in result.stdout


def test_config_prints_settings_with_secrets_redacted(run_cli: CommandRunner) -> None:
    result = run_cli("config", GEMINI_API_KEY="AIza-cli-secret", REDIS_URL="redis://:pw-9@h:1/0")
    assert result.returncode == 0, result.stderr
    assert "AIza-cli-secret" not in result.stdout + result.stderr
    assert "pw-9" not in result.stdout + result.stderr
    assert "GEMINI_RPM_LIMIT" in result.stdout


def test_config_exits_non_zero_naming_the_bad_variable(run_cli: CommandRunner) -> None:
    result = run_cli("config", GEMINI_SAFETY_FACTOR="1.7")
    assert result.returncode == 2
    assert "GEMINI_SAFETY_FACTOR" in result.stderr
