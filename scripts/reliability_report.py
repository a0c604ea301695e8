#!/usr/bin/env python3
"""Render docs/RELIABILITY.md from the figures a fault-suite run wrote (tests/faults/harness.py ``record``).

    make reliability            # runs tests/faults with RECSVC_RELIABILITY_DIR set, then this script

Usage: reliability_report.py FIGURES_DIR [--out docs/RELIABILITY.md] [--command "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

# Rows in the order of the reliability issue's table; rows of other tests follow, by name.
ORDER = [
    "test_baseline", "test_deploy", "test_deploy_proxy", "test_sigterm", "test_overload", "test_overload_proxy",
    "test_triton_frozen", "test_triton_crash",
    "test_store_outage", "test_bad_input", "test_bad_model", "test_bad_bundle_startup", "test_internal_error",
    "test_soak",
]  # fmt: skip

HEADER = """# Reliability: faults and bad input, with figures from a run

Each row is one automated test under `tests/faults/`, run against real processes (`recsvc serve`, the
tritonserver that `recsvc triton` runs, redis-server where the row needs it) while a bounded load
generator in the test (`tests/faults/harness.py`, closed loop unless the row says open loop) sends
Recommend calls. "failed" counts calls that ended with a status other than OK, by code; "degraded"
counts OK answers flagged degraded (served by a fallback), by reason. Events are RecordEvents calls'
events: acknowledged, and of those lost or stored twice.

The table is generated: `{command}` on {machine}, {when}. What follows the marker below it is
written by hand and kept when the table is regenerated.
"""


def _fmt_counter(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "0"


def _note(value: object) -> str:
    """One note value, short: a load generator's tally as its key figures, long texts cut, temp paths dropped."""
    if isinstance(value, dict) and "sent" in value:
        failed = _fmt_counter(value.get("failed", {}))
        return (f"{value['sent']} sent, failed {failed}, {value.get('degraded', 0)} degraded, "
                f"p99 {value.get('p99_ms')} ms")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_note(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_note(v) for v in value) + "]"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3g}"
    text = re.sub(r"/tmp/\S*?/(repo|case-\d+|broken-bundle)/", "…/", str(value))
    return text if len(text) <= 160 else text[:157] + "..."


def _row(body: dict) -> str:
    f = body.get("figures") or {}
    extra = body.get("extra") or {}
    sent = f.get("sent", "")
    failed = _fmt_counter(f.get("failed", {})) if f else ""
    degraded = ""
    if f:
        degraded = str(f.get("degraded", 0))
        if f.get("degraded_reasons"):
            degraded += " (" + _fmt_counter(f["degraded_reasons"]) + ")"
    events = ""
    if f and (f.get("events_acked") or f.get("events_lost") or f.get("events_duplicated")):
        events = f"{f['events_acked']} / {f['events_lost']} / {f['events_duplicated']}"
    latency = ""
    if f and f.get("p50_ms") is not None:
        latency = f"{f['p50_ms']} / {f['p99_ms']}"
    notes = "; ".join(f"{k.replace('_', ' ')}: {_note(v)}" for k, v in extra.items())
    cells = [body["row"], body["expected"], f"`{body['test']}`", str(sent), failed, degraded, events, latency, notes]
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def render(figures: Path, command: str) -> str:
    """The generated part of RELIABILITY.md from the JSON files in ``figures``."""
    bodies = [json.loads(p.read_text()) for p in sorted(figures.glob("*.json"))]
    if not bodies:
        raise SystemExit(f"no figures in {figures}: run the fault suite first (make reliability)")
    rank = {name: i for i, name in enumerate(ORDER)}
    bodies.sort(key=lambda b: (rank.get(b["test"], len(ORDER)), b["test"], b["row"]))
    when = max(b.get("recorded_at", "") for b in bodies)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = f"{command}` at commit `{rev or 'unknown'}"
    out = [HEADER.format(command=command, machine=machine, when=when)]
    out.append("| fault or input | expected behaviour | test | requests sent | failed (by code) | degraded "
               "(by reason) | events acked / lost / duplicated | p50 / p99 ms | notes |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    out.extend(_row(b) for b in bodies)
    return "\n".join(out) + "\n"


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", type=Path, help="directory of JSON figures written by the fault tests")
    parser.add_argument("--out", type=Path, default=Path("docs/RELIABILITY.md"), help="where to write")
    parser.add_argument("--command", default="make reliability", help="the command that produced the figures")
    args = parser.parse_args()
    text = render(args.figures, args.command)
    # What follows the marker in an existing file is written by hand (soak runs, analysis) and kept.
    marker = "<!-- figures end -->"
    old = args.out.read_text() if args.out.exists() else ""
    kept = old.split(marker, 1)[1] if marker in old else "\n"
    args.out.write_text(text + "\n" + marker + kept)
    sys.stderr.write(f"wrote {args.out} from {args.figures}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
