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
    monkeypatch.chdir(tmp_path)
    header = "user_id,item_id,timestamp,event_type\n"
    files = {
        "events.csv": "user_id,item_id,ts\n1,2,3\n",
        "bad_ts.csv": header + "u1,i1,1700000000,view\nu1,i2,yesterday,view\n",
        "ms.csv": header + "u1,i1,1700000000000,view\n",
        "click.csv": header + "u1,i1,1700000000,click\n",
        "ok.csv": header + "u1,SKU-7,1700000000,view\n",
        "items.csv": "item_id\n" + "".join(f"SKU-{i}\n" for i in range(1, 12)) + "SKU-7\n",
    }
    for name, text in files.items():
        Path(name).write_text(text)
    quoted = [
        _error(lambda: load_files(Path("missing.csv"))).replace("missing.csv", "events.csv"),
        _error(lambda: load_files(Path("events.csv"))),
        _error(lambda: load_files(Path("bad_ts.csv"))),
        _error(lambda: load_files(Path("ms.csv"))),
        _error(lambda: load_files(Path("click.csv"))),
        _error(lambda: load_files(Path("ok.csv"), Path("items.csv"))),
    ]
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
