"""docs/CONFIGURATION.md stays what recsvc/config.py says (recsvc/config_reference.py), and says everything."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from recsvc.config import CHOICES, Settings
from recsvc.config_reference import REGENERATE, field_docs, render_markdown

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"


def test_reference_file_is_in_sync_with_settings() -> None:
    on_disk = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    assert on_disk == render_markdown(), (
        f"docs/CONFIGURATION.md is out of date with recsvc/config.py; regenerate it from the checkout's root "
        f"with:\n    {REGENERATE}\n(.venv/bin/python there)"
    )


def test_every_setting_is_in_the_reference_with_its_default_type_and_meaning() -> None:
    docs = {d.name: d for d in field_docs()}
    text = render_markdown()
    defaults = Settings()
    assert list(docs) == [f.name for f in dataclasses.fields(Settings)]
    for f in dataclasses.fields(Settings):
        d = docs[f.name]
        assert d.env == f"RECSVC_{f.name.upper()}"
        assert d.doc, f.name
        assert f"| `{d.env}` | {d.type.replace('|', chr(92) + '|')}" in text
        value = getattr(defaults, f.name)
        if value not in (None, "") and not isinstance(value, bool):
            assert d.default == str(value)
    assert docs["port"].default == "50051"
    assert docs["redis_cluster"].default == "false"
    assert docs["tls_cert"].default == "(unset)"
    assert docs["port"].section == "gRPC server"
    # A comment block above a field is its meaning too (invalidation_ping_s has no trailing comment).
    assert "PING after this long" in docs["invalidation_ping_s"].doc
    for name, allowed in CHOICES.items():
        assert f"| `{docs[name].env}` | str: {', '.join(f'`{c}`' for c in allowed)} |" in text, name
    # The field's own comment comes first, then the block above that it shares with the next field.
    assert docs["history_budget_share"].doc.startswith("history lookup's share")
    assert "Deadline shares" in docs["history_budget_share"].doc


def test_a_setting_without_a_comment_is_refused(tmp_path: Path) -> None:
    module = tmp_path / "fake_settings.py"
    module.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass(frozen=True)\n"
        "class FakeSettings:\n"
        "    # --- things ---\n"
        "    documented: int = 1    # has a meaning\n"
        "    # a block above counts as well\n"
        "    above: int = 3\n"
        "    bare: str = 'x'\n"
    )
    spec = importlib.util.spec_from_file_location("fake_settings", module)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fake_settings"] = mod
    try:
        spec.loader.exec_module(mod)
        with pytest.raises(ValueError, match=r"without a comment .*: bare$"):
            field_docs(mod.FakeSettings)
    finally:
        del sys.modules["fake_settings"]


def test_the_regeneration_command_prints_the_reference() -> None:
    root = REFERENCE.parents[1]
    out = subprocess.run([sys.executable, "-m", "recsvc.config_reference"], cwd=root, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    assert out.stdout == render_markdown()
    assert REGENERATE.startswith("python -m recsvc.config_reference >")
