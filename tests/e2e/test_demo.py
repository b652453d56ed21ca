"""The README's first command: the demo runs a whole fleet and leaves nothing behind."""

from __future__ import annotations

import re

import psutil
import pytest
from conftest import CommandRunner


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_demo_processes_every_document_without_a_429(run_cli: CommandRunner) -> None:
    before = {p.pid for p in psutil.process_iter()}
    result = run_cli("demo", "--workers", "2", "--index", "2", "--actes", "2", "--timeout-s", "180")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("Demo summary") :]
    assert re.search(r"jobs done\s+│\s+4\b", summary)
    assert re.search(r"jobs failed\s+│\s+0\b", summary)
    assert re.findall(r"429s seen by the emulator\s+│\s+(\d+)", summary) == ["0", "0"]
    assert re.search(r"files left at the emulator\s+│\s+0\b", summary)
    leftovers = [
        p.name()
        for p in psutil.process_iter()
        if p.pid not in before
        and p.name() in ("postgres", "redis-server", "python")
        and p.ppid() != 1
    ]
    assert not leftovers, f"the demo left processes running: {leftovers}"
