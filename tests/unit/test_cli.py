"""The command line: help, config, and a clear exit on a bad setting."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "WORKER_"))}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("config", "db"):
        assert command in result.stdout


def test_config_prints_settings_with_secrets_redacted() -> None:
    result = _run("config", GEMINI_API_KEY="AIza-cli-secret", REDIS_URL="redis://:pw-9@h:1/0")
    assert result.returncode == 0, result.stderr
    assert "AIza-cli-secret" not in result.stdout + result.stderr
    assert "pw-9" not in result.stdout + result.stderr
    assert "GEMINI_RPM_LIMIT" in result.stdout


def test_config_exits_non_zero_naming_the_bad_variable() -> None:
    result = _run("config", GEMINI_SAFETY_FACTOR="1.7")
    assert result.returncode == 2
    assert "GEMINI_SAFETY_FACTOR" in result.stderr
