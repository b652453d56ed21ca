"""What operators run beside the workers: monitor, capacity planning, metrics, demo."""

from __future__ import annotations

__all__: list[str] = []
