"""Fault tests: real recsvc, tritonserver and redis-server processes under load while something breaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.offline.data import Dataset, time_split


@pytest.fixture(scope="session")
def fault_data(tiny_dataset: Dataset, tiny_bundle: Path) -> tuple[Path, Dataset]:
    """The bundle every fault stack publishes, and the interactions its store is seeded with."""
    return tiny_bundle, time_split(tiny_dataset).train


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.faults)
