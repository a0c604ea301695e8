from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsvc.deny import DenyListWatcher, read_deny_list, update_deny_list
from recsvc.errors import InvalidArgument


def test_file_format_and_atomic_updates(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    assert read_deny_list(path) == frozenset()          # no file: nothing denied
    path.write_text("A\n  B  # out of stock\n# a comment\n\nC\n")
    assert read_deny_list(path) == {"A", "B", "C"}
    assert update_deny_list(path, add=["D"], remove=["A"]) == {"B", "C", "D"}
    assert read_deny_list(path) == {"B", "C", "D"}
    assert update_deny_list(path, add=["E"], clear=True) == {"E"}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    for bad in ["", "has space", "x#y", "z" * 200]:
        with pytest.raises(InvalidArgument, match="sku"):
            update_deny_list(path, add=[bad])
    assert read_deny_list(path) == {"E"}                # a refused update changes nothing


async def test_watcher_applies_changes_and_keeps_the_list_when_the_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    applied: list[frozenset[str]] = []
    watcher = DenyListWatcher(path, applied.append, poll_s=60)
    await watcher.start()
    assert applied == [frozenset()]
    assert not await watcher.refresh()                  # unchanged (still missing): nothing re-applied
    update_deny_list(path, add=["A", "B"])
    assert await watcher.refresh() and applied[-1] == {"A", "B"}
    assert not await watcher.refresh()
    # Replaced by rename with the same size and a forced equal mtime: the inode still tells.
    tmp = tmp_path / "new"
    tmp.write_text("C\nD\n")
    st = path.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    tmp.replace(path)
    assert await watcher.refresh() and applied[-1] == {"C", "D"}
    path.unlink()
    path.mkdir()                                        # unreadable: the previous list stays in force
    assert not await watcher.refresh() and applied[-1] == {"C", "D"}
    path.rmdir()
    assert await watcher.refresh() and applied[-1] == frozenset()
    await watcher.close()
