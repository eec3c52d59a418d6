"""A registry and a tracker that keep what the orchestrator hands them, for tests of the loop alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FakeRegistry:
    """Registers versions 1, 2, ... and keeps each version's tags."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def register(self, weights: Any, tags: Mapping[str, str]) -> int:
        self.tags.append(dict(tags))
        return len(self.tags)

    def set_alias(self, version: int, alias: str) -> None:
        pass

    def load(self, alias: str) -> Any:
        return None

    def versions(self) -> list[dict[str, Any]]:
        return []


class FakeTracker:
    """Drops metrics and events."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        pass
