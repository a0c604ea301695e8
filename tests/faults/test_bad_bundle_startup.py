"""Row "truncated embeddings or a garbage query_encoder.onnx at start-up": one line naming the file, exit 2.

`recsvc serve` on a published version with one file corrupt must not start: no traceback, no SERVING
(it never binds its port), exit status 2 and one line that names the file. Both ways a file goes bad are
covered: its checksum no longer matches the manifest, and the manifest was rewritten to match the bad
bytes (so only reading the file can tell).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from recsvc.bundle import update_manifest
from recsvc.offline.data import Dataset
from recsvc.repository import publish
from tests.broken_models import damage_model
from tests.faults.harness import TRACEBACK, record
from tests.processes import stack_env
from tests.support import free_port


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x08\x07not a protobuf, not parquet\xff\x00" * 200)


# case -> (file in the version, how it is damaged, whether the manifest is rewritten to match)
CASES = {
    "item_embeddings.npy truncated (manifest rewritten)": ("bundle/item_embeddings.npy", _truncate, True),
    "item_embeddings.npy truncated (checksum mismatch)": ("bundle/item_embeddings.npy", _truncate, False),
    "query_encoder.onnx garbage (manifest rewritten)": ("bundle/query_encoder.onnx", _garbage, True),
    "items.parquet corrupt (manifest rewritten)": ("bundle/items.parquet", _garbage, True),
    "popularity.npy truncated (manifest rewritten)": ("bundle/popularity.npy", _truncate, True),
    "model.onnx 4 KiB overwritten": ("model.onnx", lambda p: damage_model(p, "overwrite"), False),
}


async def _serve(env: dict[str, str], port_file: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "recsvc.cli", "--log-format", "json", "serve", "--port", "0",
        "--port-file", str(port_file), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


async def test_a_corrupt_file_at_start_up_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    bundle, _ = fault_data
    runs = []
    for i, (case, (name, damage, rewrite)) in enumerate(CASES.items()):
        root = tmp_path / f"case-{i}"
        env = {**stack_env(root, free_port()), "RECSVC_WARM_USERS": "0"}
        version = root / "repo" / "ranker" / str(publish(bundle, root / "repo"))
        damage(version / name)
        if rewrite:
            update_manifest(version / "bundle")
        runs.append((case, name, root / "port", _serve(env, root / "port")))
    # Two at a time: each process imports the whole runtime, and the machine may have two cores.
    gate = asyncio.Semaphore(2)

    async def limited(coro):  # type: ignore[no-untyped-def]
        async with gate:
            return await coro

    results = await asyncio.gather(*(limited(run) for *_, run in runs))
    figures: dict[str, dict[str, object]] = {}
    for (case, *_), (status, out, err) in zip(runs, results, strict=True):
        lines = [line for line in err.splitlines() if line.startswith("recsvc serve:")]
        figures[case] = {"exit": status, "line": lines[0] if lines else None,
                         "stderr_lines": len(err.splitlines()), "tracebacks": len(TRACEBACK.findall(out + err))}
    record("truncated embeddings or a garbage query_encoder.onnx at start-up", "test_bad_bundle_startup",
           "one clear line naming the file, exit 2, never SERVING", None, cases=figures)  # fmt: skip
    for (case, name, port_file, _), (status, out, err) in zip(runs, results, strict=True):
        assert status == 2, (case, status, err[-3000:])
        lines = [line for line in err.splitlines() if line.startswith("recsvc serve:")]
        assert len(lines) == 1 and Path(name).name in lines[0], (case, err[-3000:])
        assert not TRACEBACK.search(out + err), (case, err[-3000:])
        assert not port_file.exists(), case            # never bound its port: never SERVING
