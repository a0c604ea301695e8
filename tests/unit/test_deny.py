from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest

from recsvc.deny import DenyListWatcher, format_sku, parse_line, read_deny_list, update_deny_list
from recsvc.errors import InvalidArgument
from recsvc.ids import valid_id


def test_file_format_and_atomic_updates(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    assert read_deny_list(path) == frozenset()          # no file: nothing denied
    path.write_text("A\n  B  # out of stock\n# a comment\n\nC\n")
    assert read_deny_list(path) == {"A", "B", "C"}
    assert update_deny_list(path, add=["D"], remove=["A"]) == {"B", "C", "D"}
    assert read_deny_list(path) == {"B", "C", "D"}
    assert update_deny_list(path, add=["E"], clear=True) == {"E"}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    for bad in ["", " lead", "trail ", "nul\x00", "line\nbreak", "z" * 200]:
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


# Ids the API accepts (recsvc/ids.py) that the old format could not hold: inner spaces, '#', backslashes.
API_IDS = ["has space", "x#y", "#leading-hash", "trailing#", "back\\slash", "esc\\#aped", "\\", "\\\\#", "ünï cødé #1",
           "a  #  b"]


def test_every_id_the_api_accepts_can_be_denied(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    ids = [i for i in API_IDS if valid_id(i, 128)]
    assert len(ids) == len(API_IDS)                      # they really are valid ids
    assert update_deny_list(path, add=ids) == set(ids)
    assert read_deny_list(path) == set(ids)              # and they survive the file
    for sku in ids:
        assert parse_line(format_sku(sku)) == sku
        assert parse_line(f"  {format_sku(sku)}   # a comment") == sku
    assert update_deny_list(path, remove=["x#y"]) == set(ids) - {"x#y"}
    # Hand-written files keep working: comments, blank lines, a lone backslash is literal.
    path.write_text("A  # out of stock\n\n# comment\nC:\\dir\nweird\\#tag  # real comment\n")
    assert read_deny_list(path) == {"A", "C:\\dir", "weird#tag"}


def test_the_list_is_replaced_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lists" / "deny.txt"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    update_deny_list(path, add=["A"])
    # The temporary file's content first, then (after the rename) the directory entry.
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == "dir"
    assert read_deny_list(path) == {"A"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["deny.txt", "deny.txt.lock"]


async def test_a_failing_apply_keeps_the_last_good_list_and_the_watcher_alive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "deny.txt"
    update_deny_list(path, add=["A"])
    applied: list[frozenset[str]] = []
    broken = {"on": False}

    def apply(skus: frozenset[str]) -> None:
        if broken["on"]:
            raise RuntimeError("the index refused the new list")
        applied.append(skus)

    watcher = DenyListWatcher(path, apply, poll_s=0.01)
    await watcher.start()
    assert applied == [{"A"}]
    broken["on"] = True
    update_deny_list(path, add=["B"])
    with caplog.at_level("ERROR", logger="recsvc.deny"):
        for _ in range(500):                             # the watcher's own task meets the failure
            if watcher.failures >= 3:
                break
            await asyncio.sleep(0.01)
    assert watcher.failures >= 3 and applied == [{"A"}]  # retried; the last good list stays in force
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is not None     # logged once, with the traceback
    broken["on"] = False                                 # the watcher is still alive: it applies B now
    for _ in range(500):
        if applied[-1] == {"A", "B"}:
            break
        await asyncio.sleep(0.01)
    assert applied[-1] == {"A", "B"}
    assert watcher._task is not None and not watcher._task.done()
    await watcher.close()


async def test_the_watcher_survives_an_error_outside_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "deny.txt"
    applied: list[frozenset[str]] = []
    watcher = DenyListWatcher(path, applied.append, poll_s=0.01)
    await watcher.start()
    real = DenyListWatcher._signature
    calls = {"n": 0}

    def flaky(self: DenyListWatcher) -> tuple[int, int, int] | None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise PermissionError("stat: permission denied")
        return real(self)

    monkeypatch.setattr(DenyListWatcher, "_signature", flaky)
    update_deny_list(path, add=["Z"])
    for _ in range(500):
        if applied[-1] == {"Z"}:
            break
        await asyncio.sleep(0.01)
    assert calls["n"] > 3 and applied[-1] == {"Z"}
    await watcher.close()


async def test_a_path_that_stays_unreadable_is_logged_once_per_interval_not_every_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    watcher = DenyListWatcher(tmp_path / "deny.txt", lambda skus: None, poll_s=0.01)
    await watcher.start()
    try:
        watcher.path = blocker / "deny.txt"          # from now on stat() fails with NotADirectoryError
        with caplog.at_level(logging.ERROR, logger="recsvc.deny"):
            await asyncio.sleep(0.3)
    finally:
        await watcher.close()
    assert len([r for r in caplog.records if "checking deny list" in r.getMessage()]) == 1
