"""The README's first command: the demo runs a whole fleet and leaves nothing behind."""

from __future__ import annotations

import re

import psutil
import pytest
from conftest import CommandRunner


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_demo_processes_every_document_without_a_429(run_cli: CommandRunner) -> None:
    result = run_cli("demo", "--workers", "2", "--index", "2", "--actes", "2", "--timeout-s", "180")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("Demo summary") :]
    assert re.search(r"jobs done\s+│\s+4\b", summary)
    assert re.search(r"jobs failed\s+│\s+0\b", summary)
    assert re.findall(r"429s seen by the emulator\s+│\s+(\d+)", summary) == ["0", "0"]
    assert re.search(r"files left at the emulator\s+│\s+0\b", summary)
    # The demo's workers carry its worker ids: none may outlive it.
    leftovers = [p.pid for p in psutil.process_iter() if _is_demo_worker(p)]
    assert not leftovers, f"the demo left worker processes running: {leftovers}"


def _is_demo_worker(process: psutil.Process) -> bool:
    try:
        return process.environ().get("WORKER_ID", "").startswith("demo-worker-")
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
