"""docs/CONFIGURATION.md, generated from ``Settings`` so the reference cannot drift from the code.

    python -m recsvc.config_reference > docs/CONFIGURATION.md

A setting's meaning is the comment that goes with its field in ``recsvc/config.py``: the comment at the
end of the field's line, after the comment lines directly above it (if any). Section headers
(``# --- name ---``) group the table. Every field must have a comment: ``field_docs`` raises otherwise,
and ``tests/unit/test_config_reference.py`` keeps docs/CONFIGURATION.md equal to this module's output.
Nothing here is imported by the server: it reads config.py's source with ``ast`` and ``tokenize``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from dataclasses import dataclass
from typing import Any

from recsvc.config import CHOICES, ENV_PREFIX, Settings

__all__ = ["REGENERATE", "FieldDoc", "field_docs", "main", "render_markdown"]

REGENERATE = "python -m recsvc.config_reference > docs/CONFIGURATION.md"
_SECTION = "# ---"


@dataclass(frozen=True)
class FieldDoc:
    """One setting as the reference shows it."""

    name: str         # field name (the override key, e.g. CLI code)
    env: str          # RECSVC_FOO_BAR
    type: str         # the annotation, e.g. "Path | None"
    default: str      # as it would be written in the environment; "(unset)" for None
    section: str      # the "# --- ... ---" header above it
    doc: str          # its comment(s)


def field_docs(cls: type[Any] = Settings) -> list[FieldDoc]:
    """Every field of the dataclass ``cls`` (``Settings``) with its section and comment, in declaration order.

    Raises ValueError naming the fields that have no comment.
    """
    source = inspect.getsource(sys.modules[cls.__module__])
    comments: dict[int, str] = {}      # line number -> the comment on it
    code_lines: set[int] = set()        # lines holding something other than a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    lines: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    lines[stmt.target.id] = stmt.lineno

    docs: list[FieldDoc] = []
    missing: list[str] = []
    section = ""
    defaults = cls()
    for f in dataclasses.fields(cls):
        line = lines[f.name]
        above: list[str] = []
        n = line - 1
        while n in comments and n not in code_lines:      # the comment block directly above the field
            if comments[n].startswith(_SECTION):
                section = comments[n].strip("# -")
                break
            above.insert(0, _text(comments[n]))
            n -= 1
        trailing = _text(comments[line]) if line in comments else ""
        # The field's own comment first: a block above may be shared with the fields after it.
        block = " ".join(above)
        doc = f"{trailing.rstrip('.')}. {block}" if trailing and block else trailing or block
        if not doc:
            missing.append(f.name)
        docs.append(FieldDoc(name=f.name, env=ENV_PREFIX + f.name.upper(), type=str(f.type),
                             default=_env_value(getattr(defaults, f.name)), section=section, doc=doc))  # fmt: skip
    if missing:
        raise ValueError(f"settings without a comment in {inspect.getsourcefile(cls)} (say what each means, on its "
                         f"line or just above it): {', '.join(missing)}")
    return docs


def _text(comment: str) -> str:
    return comment.lstrip("#").strip()


def _env_value(value: object) -> str:
    """How the default would be written in a ``RECSVC_*`` variable."""
    if value is None:
        return "(unset)"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (``<data_dir>`` would be taken for an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown() -> str:
    """The whole of docs/CONFIGURATION.md."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from recsvc/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Settings come from the defaults below, then `RECSVC_*` environment variables, then command-line flags",
        "(`--port`, `--data-dir`, `--model-repository`, `--triton-url`). Field `foo_bar` of `recsvc.config.Settings`",
        "is read from `RECSVC_FOO_BAR`. An unknown `RECSVC_*` variable is an error (a typo must not fall back to a",
        "default silently); the error suggests the closest names. Booleans take `true/false`, `1/0`, `yes/no` or",
        "`on/off`; an empty value unsets an optional path. Values are checked at start-up, and a bad one is a",
        "single `ConfigError` line naming the setting (exit status 2).",
        "",
    ]
    section = None
    for d in field_docs():
        if d.section != section:
            section = d.section
            if out[-1] != "":
                out.append("")
            out += [f"## {section}", "", "| variable | type | default | meaning |",
                    "|---|---|---|---|"]  # fmt: skip
        kind = _cell(d.type)
        if d.name in CHOICES:
            kind += ": " + ", ".join(f"`{c}`" for c in CHOICES[d.name])
        default = d.default if d.default in ("(unset)", "(empty)") else f"`{d.default}`"
        out.append(f"| `{d.env}` | {kind} | {_cell(default)} | {_cell(d.doc)} |")
    return "\n".join(out) + "\n"


def main() -> int:
    """Print docs/CONFIGURATION.md."""
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

