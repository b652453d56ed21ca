"""Worker runtime that OCRs Quebec land-registry documents through Gemini.

Every Gemini call of every process passes one fleet-wide limiter, so the whole fleet
shares one quota without 429s.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
