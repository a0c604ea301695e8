"""The README's links lead somewhere, and the error texts its troubleshooting quotes are the code's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recsvc.config import load_settings
from recsvc.errors import RecsvcError
from recsvc.offline.data import load_files

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_two_commands_at_the_top_are_unchanged() -> None:
    top = README[: README.index("## ")]
    assert "make up      # set up, train on MovieLens" in top
    assert "make test    # set up, then ruff, mypy and the whole test suite" in top


def test_every_relative_link_and_picture_exists() -> None:
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/architecture.png" in local and "docs/cache_sim.png" in local and "docs/latency.png" in local
    assert "docs/CONFIGURATION.md" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_every_docs_page_is_linked() -> None:
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in README, f"README does not link docs/{page.name}"


def _error(call: object) -> str:
    assert callable(call)
    with pytest.raises(RecsvcError) as err:
        call()
    return str(err.value)


def test_quoted_setting_errors_are_the_codes() -> None:
    unknown = _error(lambda: load_settings(env={"RECSVC_PROT": "1"}))
    assert f"`{unknown}`" in README
    out_of_range = _error(lambda: load_settings(env={"RECSVC_PORT": "70000"}))
    assert f"`{out_of_range}`" in README


def test_quoted_data_file_errors_are_the_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each error the README's Troubleshooting quotes, from an events.csv (and items.csv) that causes it."""
    header = "user_id,item_id,timestamp,event_type\n"
    cases: dict[str, tuple[str | bytes, str | None]] = {
        "missing": ("user_id,item_id,ts\n1,2,3\n", None),
        "near": ("user_id,item_id,timestamp,Event_Type\nu1,i1,1700000000,view\n", None),
        "bad_ts": (header + "u1,i1,1700000000,view\nu1,i2,yesterday,view\n", None),
        "ms": (header + "u1,i1,1700000000000,view\n", None),
        "future": (header + "".join(f"u1,i{n},1700000000,view\n" for n in range(4)) + "u1,i9,9999-12-31,view\n",
                   None),
        "id": (header + "u-1,i1,1700000000,view\nu-2,i1,1700000000,view\nu-1 ,i1,1700000000,view\n", None),
        "click": (header + "u1,i1,1700000000,click\n", None),
        "latin1": ((header + "Ren\u00e9,i1,1700000000,view\n").encode("latin-1"), None),
        "comma": (header + "u1,i1,1700000000,view,\n", None),
        "items": (header + "u1,SKU-7,1700000000,view\n",
                  "item_id\n" + "".join(f"SKU-{i}\n" for i in range(1, 12)) + "SKU-7\n"),
    }
    quoted = []
    for name, (events, items) in cases.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        if isinstance(events, bytes):
            Path("events.csv").write_bytes(events)
        else:
            Path("events.csv").write_text(events)
        if items is not None:
            Path("items.csv").write_text(items)
        catalog = Path("items.csv") if items is not None else None
        error = _error(lambda: load_files(Path("events.csv"), catalog))  # noqa: B023 (called at once)
        quoted.append(re.sub(r"later than \S+, a day", "later than ..., a day", error))
    quoted.append(_error(lambda: load_files(Path("missing.csv"))).replace("missing.csv", "events.csv"))
    for text in quoted:
        assert f"`{text}`" in README, text


def test_architecture_diagram_names_real_components() -> None:
    """The diagram's class names (CamelCase words in docs/architecture.dot) are classes recsvc defines."""
    dot = (ROOT / "docs" / "architecture.dot").read_text(encoding="utf-8")
    labels = " ".join(re.findall(r'label="([^"]*)"', dot))
    not_classes = {"MovieLens", "RecordEvents"}     # a dataset and an RPC
    names = set(re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+\b", labels)) - not_classes
    assert {"TieredHistory", "TritonRanker", "RecommenderServicer"} <= names
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "recsvc").rglob("*.py"))
    missing = sorted(n for n in names if not re.search(rf"^class {n}\b", source, re.MULTILINE))
    assert not missing, f"docs/architecture.dot names classes recsvc no longer has: {missing} (then re-render it)"
    for module in re.findall(r"\(([a-z_/]+\.py)", labels):
        assert (ROOT / "recsvc" / module).is_file(), module
