"""Row "model.onnx damaged but loadable": refused before Triton loads it, never served, 0 failed requests.

Each damage leaves a model ONNX Runtime (and Triton) would load: 4 KiB of a weight overwritten, a weight
replaced by other values, NaN weights. Under load, each is rolled out the way an operator would
(`recsvc rollout N` after `recsvc publish --no-rollout`, the file damaged in between) and refused by its
checksum before Triton sees it; bundles damaged before publishing are refused by `recsvc publish`
(checksum, or NaN weights when the manifest was rewritten to match). The serving version never changes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import grpc

from recsvc.bundle import update_manifest
from recsvc.offline.data import Dataset
from recsvc.repository import publish
from recsvc.repository.rollout import ServingState, read_serving, write_serving
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.broken_models import DAMAGES, damage_model
from tests.faults.harness import LoadGen, fault_stack, record
from tests.processes import http_ok

CLIENTS = 16


async def recsvc(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run a `recsvc` command without blocking the load generator's loop; (exit status, its output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "recsvc.cli", "--log-format", "text", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(errors="replace")


async def test_damaged_models_are_refused_and_never_served(tmp_path: Path, fault_data: tuple[Path, Dataset]) -> None:
    bundle, _ = fault_data
    async with fault_stack(tmp_path, *fault_data) as stack:
        repo, env = tmp_path / "repo", stack.env
        write_serving(repo, "ranker", ServingState(version=1, loaded=(1,)))   # version 1 serves (rolled out)
        http = f"http://127.0.0.1:{env['RECSVC_TRITON_HTTP_PORT']}"
        gen = LoadGen(stack.target, stack.users, clients=CLIENTS, retry=False)
        cases: dict[str, str] = {}
        ever_loaded: list[int] = []
        async with gen.background(max_s=120) as tally:
            await asyncio.sleep(0.5)
            # Damaged after publishing, then rolled out: refused by the pre-flight's checksum check.
            for how in DAMAGES:
                version = await asyncio.to_thread(publish, bundle, repo)
                await asyncio.to_thread(damage_model, repo / "ranker" / str(version) / "model.onnx", how)
                status, out = await recsvc(env, "rollout", str(version))
                cases[f"model.onnx {how}, then rollout {version}"] = out.strip().splitlines()[-1]
                assert status == 2, out
                assert f"version {version} refused before loading" in out and "model.onnx checksum" in out, out
                if await asyncio.to_thread(http_ok, f"{http}/v2/models/ranker/versions/{version}/ready"):
                    ever_loaded.append(version)
            # Damaged before publishing: the manifest no longer matches...
            broken = tmp_path / "broken-bundle"
            shutil.copytree(bundle, broken)
            await asyncio.to_thread(damage_model, broken / "ranker.onnx", "overwrite")
            status, out = await recsvc(env, "publish", str(broken))
            cases["ranker.onnx overwritten, then publish"] = out.strip().splitlines()[-1]
            assert status == 2 and "ranker.onnx checksum" in out, out
            # ...or it was rewritten to match NaN weights: the weights themselves are checked.
            await asyncio.to_thread(damage_model, broken / "ranker.onnx", "nan")
            await asyncio.to_thread(update_manifest, broken)
            status, out = await recsvc(env, "publish", str(broken))
            cases["NaN weights with a matching manifest, then publish"] = out.strip().splitlines()[-1]
            assert status == 2 and "NaN or infinite" in out, out
            await asyncio.sleep(2 * float(env.get("RECSVC_REPOSITORY_POLL_S", "2")))   # a follower poll or two
        async with grpc.aio.insecure_channel(stack.target) as channel:
            reply = await pb_grpc.RecommenderStub(channel).Recommend(  # type: ignore[no-untyped-call]
                pb.RecommendRequest(user_id=stack.users[0], k=5), timeout=5)
        state = read_serving(repo, "ranker")
        record("model.onnx damaged but loadable (4 KiB overwritten, weights replaced, NaN weights)",
               "test_bad_model", "refused with a clear error before Triton loads it (checksums at publish, "
               "rollout and re-pin; NaN weights at publish); never served; 0 failed requests", tally,
               clients=CLIENTS, cases=cases, refused=list(state.refused) if state else None)  # fmt: skip
        assert state is not None and state.version == 1 and state.refused == (2, 3, 4), state
        assert ever_loaded == []                                    # Triton never loaded a damaged version
        assert reply.model_version == "1" and not reply.degraded    # still ranked by the version before
        assert "switched to ranker version" not in stack.server.tail(10**7)
        assert tally.sent > CLIENTS * 3
        assert tally.failed_total == 0, tally.failed
        assert tally.degraded == 0, tally.degraded_reasons
        assert stack.tracebacks() == 0
