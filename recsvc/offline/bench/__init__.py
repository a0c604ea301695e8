"""Offline benchmarks behind CLI commands (``recsvc cache-sim``); nothing here runs in the server."""

from __future__ import annotations

__all__: list[str] = []
