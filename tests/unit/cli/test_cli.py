"""The CLI a new user meets: options, help, errors as one line, data files, seed, deny, evaluate, record."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from recsvc import __version__
from recsvc.bundle import read_manifest, update_extra
from recsvc.cli import _parser, main
from recsvc.cli.training import DEFAULT_CANDIDATES
from recsvc.config import Settings
from recsvc.domain import Event, EventType
from recsvc.history import SqliteHistoryStore
from recsvc.offline.data import Dataset
from recsvc.offline.models.train import TrainConfig
from recsvc.repository import publish, version_dir
from recsvc.repository.publishing import config_for_bundle
from recsvc.repository.rollout import canary_inputs
from recsvc.repository.tiny_bundle import write_tiny_bundle
from recsvc.server.client import _event
from tests.unit.server.serving import ServerThread, publish_tiny, settings_for


def _commands(parser: argparse.ArgumentParser, name: str = "recsvc") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def _one_error_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"recsvc {__version__}\n"


def test_every_option_has_help_and_no_help_has_rst_markup() -> None:
    for name, parser in _commands(_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        assert not re.search(r"``|:[a-z]+:`|`", text), f"{name} --help shows markup:\n{text}"
        # Help speaks to users: no source files or function names (module notes are for developers).
        assert not re.search(r"\w+\.py\b|\w+_\w+\(", text), f"{name} --help shows internals:\n{text}"


def test_help_lists_only_the_options_a_command_uses() -> None:
    helps = {name: parser.format_help() for name, parser in _commands(_parser())}
    for name in ("recsvc deny add", "recsvc seed", "recsvc train"):
        assert "--data-dir" in helps[name] and "--triton-url" not in helps[name]
        assert "--model-repository" not in helps[name]
    assert "--data-dir" not in helps["recsvc recommend"] and "--triton-url" not in helps["recsvc recommend"]
    assert "--model-repository" not in helps["recsvc record"]
    assert "--data-dir" not in helps["recsvc update-catalog"] and "--data-dir" not in helps["recsvc evaluate"]
    assert "--triton-url" in helps["recsvc serve"] and "--triton-url" in helps["recsvc publish"]
    assert "--interactions" in helps["recsvc up"] and "--skip-bad-rows" in helps["recsvc up"]


def test_log_level_has_choices_and_is_accepted_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deny", "list", "--data-dir", str(tmp_path), "--log-level", "WARNING"]) == 0
    assert main(["--log-level", "debug", "deny", "list", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["deny", "list", "--log-level", "loud"])
    assert exit_.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "recsvc deny list: argument --log-level: invalid choice: 'loud'")
    assert line.endswith("(see recsvc deny list --help)")


def test_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache-sim", "--trace", str(tmp_path / "nope.txt"), "--png", str(tmp_path / "x.png")]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc cache-sim: No such file or directory: {tmp_path / 'nope.txt'}")


def test_unreadable_trace_and_query_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "text.npy").write_text("not numpy")
    assert main(["cache-sim", "--trace", str(tmp_path / "bin.csv"), "--png", str(tmp_path / "x.png")]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc cache-sim: {tmp_path / 'bin.csv'}: not a text trace (one key "
                    "per line, UTF-8) nor a .npy: invalid start byte at byte 0")  # fmt: skip
    assert main(["cache-sim", "--trace", str(tmp_path / "text.npy"), "--png", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(f"recsvc cache-sim: {tmp_path / 'text.npy'}: not a NumPy .npy array")
    bundle = tmp_path / "bundle"
    write_tiny_bundle(bundle)
    assert main(["build-index", str(bundle), "--queries", str(tmp_path / "text.npy")]) == 2
    assert capsys.readouterr().err.startswith(f"recsvc build-index: --queries {tmp_path / 'text.npy'}: not a NumPy")


def test_a_closed_pipe_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "deny_list.txt").write_text("".join(f"SKU-{n}\n" for n in range(200_000)))
    proc = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "deny", "list", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()              # `| head -c 10`: the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 2
    _one_error_line(err, "recsvc deny: output closed before it was all written (broken pipe)")


def test_deny_takes_skus_and_options_in_any_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert main(["deny", "add", "A", "--data-dir", d, "B"]) == 0
    assert main(["deny", "add", "--data-dir", d, "with space", "a#b"]) == 0
    assert main(["deny", "remove", "B", "--data-dir", d]) == 0
    assert main(["deny", "add", "--data-dir", d, "--", "-dash"]) == 0
    assert main(["deny", "--data-dir", d, "add", "C"]) == 0                # the option before the action too
    assert main(["deny", "--data-dir", d, "remove", "C"]) == 0
    capsys.readouterr()
    assert main(["deny", "list", "--data-dir", d]) == 0
    assert capsys.readouterr().out.splitlines() == ["-dash", "A", "a#b", "with space"]
    with pytest.raises(SystemExit) as exit_:
        main(["deny", "add", "--data-dir", d])
    assert exit_.value.code == 2
    _one_error_line(capsys.readouterr().err, "recsvc deny add: the following arguments are required: SKU")
    assert main(["deny", "add", " padded", "--data-dir", d]) == 2         # what the API refuses, refused
    _one_error_line(capsys.readouterr().err, "recsvc deny: sku ' padded': must not start or end with whitespace")
    assert main(["deny", "remove", "NOPE", "--data-dir", d]) == 0          # removed or not, it is not denied
    assert "'NOPE' was not on the deny list" in capsys.readouterr().err
    missing = str(Path(d) / "misspelt")
    assert main(["deny", "list", "--data-dir", missing]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc deny: no folder {missing} (--data-dir or RECSVC_DATA_DIR "
                    "misspelt?)")  # fmt: skip


# --------------------------------------------------------------------------------------------- data
def _write_files(ds: Dataset, directory: Path) -> tuple[Path, Path]:
    interactions, items = directory / "events.csv", directory / "items.csv"
    pd.DataFrame(list(ds.event_rows()), columns=["user_id", "item_id", "event_type", "timestamp"]).to_csv(
        interactions, index=False)
    ds.items_frame().to_csv(items, index=False)
    return interactions, items


def _users(data_dir: Path) -> int:
    async def count() -> int:
        store = await SqliteHistoryStore.open(Settings(data_dir=data_dir).resolved_history_db(), keep=1000)
        try:
            return int(await store.count_users())
        finally:
            await store.close()

    return asyncio.run(count())


def test_data_files_imply_dataset_files_and_seed_refuses_a_full_store(
    tmp_path: Path, tiny_dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    interactions, items = _write_files(tiny_dataset, tmp_path)
    var = str(tmp_path / "var")
    assert main(["seed", "--interactions", str(interactions), "--items", str(items), "--data-dir", var]) == 0
    assert _users(tmp_path / "var") == tiny_dataset.num_users          # the user's data, not MovieLens
    assert f"seeded {tiny_dataset.num_interactions:,} events" in capsys.readouterr().out
    assert main(["seed", "--interactions", str(interactions), "--data-dir", var]) == 2
    _one_error_line(capsys.readouterr().err, "recsvc seed: history store")
    # Refused before the file is read: a file that is gone by now does not matter.
    assert main(["seed", "--interactions", str(tmp_path / "gone.csv"), "--data-dir", var, "--if-empty"]) == 0
    assert main(["seed", "--interactions", str(interactions), "--data-dir", var, "--if-empty"]) == 0
    assert "already has users; left as it is" in capsys.readouterr().out
    assert _users(tmp_path / "var") == tiny_dataset.num_users
    assert main(["seed", "--dataset", "movielens", "--interactions", str(interactions), "--data-dir", var]) == 2
    _one_error_line(capsys.readouterr().err, "recsvc seed: --interactions/--items are your own data: drop "
                                             "--dataset movielens")
    assert main(["train", "--dataset", "files"]) == 2
    _one_error_line(capsys.readouterr().err, "recsvc train: your own data needs --interactions FILE")


def test_duplicates_and_bad_rows_are_reported_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\nu,A,1\nu,A,1\nu,B,later\nv,A,2\n")
    assert main(["seed", "--interactions", str(events), "--data-dir", str(tmp_path / "a")]) == 2
    assert "unparsable timestamp 'later' in row 3" in capsys.readouterr().err
    assert main(["seed", "--interactions", str(events), "--skip-bad-rows", "--data-dir", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "seeded 2 events" in captured.out
    assert "1 duplicate rows dropped" in captured.err and "skipped 1 bad rows; first: row 3" in captured.err
    assert main(["seed", "--interactions", str(events), "--skip-bad-rows", "--keep-duplicates",
                 "--data-dir", str(tmp_path / "c")]) == 0  # fmt: skip
    assert "seeded 3 events" in capsys.readouterr().out


def test_evaluate_uses_the_bundles_own_data_or_says_what_it_needs(
    tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert main(["evaluate", str(bundle), "--eval-users", "50"]) == 2     # records no data: says what to pass
    _one_error_line(capsys.readouterr().err, f"recsvc evaluate: {bundle} was trained on {tiny_dataset.name!r} and "
                                             "does not record where that data is: pass it (--interactions FILE")
    interactions, items = _write_files(tiny_dataset, tmp_path)
    update_extra(bundle, {"data_source": {"dataset": "files", "interactions": str(interactions),
                                          "items": str(items)}})  # fmt: skip
    assert main(["evaluate", str(bundle), "--eval-users", "50"]) == 0
    assert "recall@10" in capsys.readouterr().out
    # Data without the bundle's items: one line, not an ONNX Runtime traceback.
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id,timestamp\nu,A,1\nu,B,2\nv,A,3\n")
    assert main(["evaluate", str(bundle), "--interactions", str(other)]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc evaluate: {bundle} was trained on 120 items; this data")
    (tmp_path / "events.csv").unlink()
    assert main(["evaluate", str(bundle)]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc evaluate: {bundle} was trained on {interactions}, which no "
                                             "longer exist")


# ------------------------------------------------------------------------------------------ training
_WARMUP_CANDIDATES = re.compile(r'key: "CANDIDATES"\s+value: \{[^}]*dims: \[ (\d+) \]')


def test_train_candidates_is_the_c_of_everything_built_from_the_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    assert main(["train", "--dataset", "synthetic", "--synthetic-users", "200", "--synthetic-items", "250",
                 "--epochs", "1", "--ranker-epochs", "1", "--eval-users", "50", "--candidates", "200",
                 "--out", str(bundle)]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = read_manifest(bundle)
    assert manifest.num_candidates == 200 and manifest.extra["train_config"]["num_candidates"] == 200
    # The ranker's candidate axis stays free (one Triton config serves any C); the bundle's own inputs
    # (INT8 calibration, canary, benchmarks) are [N, 200], and the ranker scores all 200.
    with np.load(bundle / "samples.npz") as stored:
        samples = {name: stored[name].astype(np.int64) for name in stored.files}
    assert samples["CANDIDATES"].shape[1] == 200
    session = ort.InferenceSession(str(bundle / "ranker.onnx"), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["SCORES"], samples)
    assert scores.shape == samples["CANDIDATES"].shape and np.isfinite(scores).all()
    # Published: the model config's warm-up samples (Triton refuses a load whose warm-up fails) and the
    # rollout canary are shaped for 200 candidates, on every target.
    version = publish(bundle, tmp_path / "repo")
    config = (tmp_path / "repo" / "ranker" / "config.pbtxt").read_text(encoding="utf-8")
    assert _WARMUP_CANDIDATES.findall(config) == ["200", "200"]
    for target in ("gpu", "gpu-onnx", "gpu-torch"):
        assert _WARMUP_CANDIDATES.findall(config_for_bundle(target, manifest)) == ["200", "200"], target
    assert canary_inputs(version_dir(tmp_path / "repo", "ranker", version) / "bundle")["CANDIDATES"].shape[1] == 200


def test_train_and_evaluate_share_the_split_and_report_the_classical_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    data = ["--dataset", "synthetic", "--synthetic-users", "200", "--synthetic-items", "250"]
    assert main(["train", *data, "--epochs", "1", "--ranker-epochs", "1", "--test-fraction", "0.2", "--baselines",
                 "--als-factors", "8", "--out", str(bundle)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out evaluation (latest 20% of each user's interactions" in out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "recall" not in line]
    assert rows == ["popularity", "EASE^R", "implicit ALS", "retrieval", "item-to-item", "retrieval+ranking"]
    manifest = read_manifest(bundle)
    assert manifest.extra["split"] == {"test_fraction": 0.2}
    assert {"recall@10/EASE^R", "ndcg@10/implicit ALS", "recall@10/retrieval+ranking"} <= set(manifest.metrics)
    # evaluate redoes the bundle's own split unasked, with the same figures for the same methods.
    assert main(["evaluate", str(bundle), "--als-factors", "8"]) == 0
    again = capsys.readouterr().out
    assert "latest 20% of each user's interactions" in again
    table = {line.split("|")[1].strip(): line for line in again.splitlines() if line.startswith("| ")}
    for method in ("popularity", "EASE^R", "retrieval+ranking"):
        recall = float(table[method].split("|")[2])
        assert recall == pytest.approx(manifest.metrics[f"recall@10/{method}"], abs=1e-4), method
    # Another protocol on request; the baselines can be left out; both protocols at once is a usage error.
    assert main(["evaluate", str(bundle), "--test-per-user", "3", "--no-baselines"]) == 0
    other = capsys.readouterr().out
    assert "last 3 interactions per user" in other and "EASE^R" not in other
    for bad, message in ((["--test-per-user", "3", "--test-fraction", "0.2"], "argument --test-fraction: not "
                          "allowed with argument --test-per-user"),
                         (["--test-fraction", "1.5"], "argument --test-fraction: expected a fraction between 0 and 1")):
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", str(bundle), *bad])
        assert exit_.value.code == 2
        _one_error_line(capsys.readouterr().err, f"recsvc evaluate: {message}")


def test_data_with_no_user_to_hold_out_says_so_instead_of_a_table_of_zeros(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\nu1,i1,1714565000\nu2,i2,1714565001\n")
    bundle = tmp_path / "bundle"
    assert main(["train", "--interactions", str(events), "--epochs", "1", "--ranker-epochs", "1", "--no-blend",
                 "--out", str(bundle)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out evaluation (last 5 interactions per user): no user to evaluate: a user counts" in out
    assert "| popularity |" not in out
    assert main(["evaluate", str(bundle), "--no-baselines"]) == 2
    _one_error_line(capsys.readouterr().err, "recsvc evaluate: last 5 interactions per user: no user to evaluate: "
                    "a user counts when they keep at least one interaction for training and their held-out ones "
                    "include items new to them; more interactions per user are needed")  # fmt: skip


def test_the_clis_default_candidates_is_the_training_apis() -> None:
    assert DEFAULT_CANDIDATES == TrainConfig().num_candidates == 100


@pytest.mark.parametrize("command", ["train", "up"])
@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5", ""])
def test_candidates_must_be_a_positive_integer(command: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--candidates", value])
    assert exit_.value.code == 2
    line = _one_error_line(capsys.readouterr().err,
                           f"recsvc {command}: argument --candidates: expected a positive integer, got {value!r}")
    assert line.endswith(f"(see recsvc {command} --help)")


def test_more_candidates_than_items_is_refused_and_the_default_fits_a_small_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    small = ["train", "--dataset", "synthetic", "--synthetic-users", "50", "--synthetic-items", "80", "--epochs", "1",
             "--ranker-epochs", "1", "--no-holdout", "--out", str(out)]  # fmt: skip
    assert main([*small, "--candidates", "81"]) == 2
    _one_error_line(capsys.readouterr().err, "recsvc train: --candidates 81: more than the 80 items of synthetic; "
                                             "choose at most 80")  # fmt: skip
    assert not out.exists()                     # refused before training
    assert main(small) == 0                     # unset: 100 would not fit, the whole catalog does
    assert read_manifest(out).num_candidates == 80


# -------------------------------------------------------------------------------------------- client
def test_the_client_sends_an_event_id() -> None:
    assert _event(Event("u", "i", EventType.VIEW, 1.0, "mine")).event_id == "mine"
    ids = {_event(Event("u", "i", EventType.VIEW, 1.0)).event_id for _ in range(3)}
    assert len(ids) == 3 and all(ids)


def test_a_retried_record_is_stored_once(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = publish_tiny(tiny_bundle, tmp_path / "repo")
    server = ServerThread(version, settings_for())
    with server as running:
        for _ in range(2):
            assert main(["record", "u-1", "sku-3", "--event-id", "e-1", "--target", running.target]) == 0
        assert main(["record", "u-1", "sku-4", "--target", running.target]) == 0
        history = server.call(running.store.get("u-1", 10))
    assert history.item_ids == ("sku-3", "sku-4")
    # The retry is told it was not stored again.
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "accepted 1 event(s)", "accepted 1 event(s); 1 already stored (same event id), not stored again",
        "accepted 1 event(s)"]


def test_client_commands_load_no_serving_pipeline() -> None:
    # `recsvc recommend/record` start fast: the parser and the bundled client, not the server behind them.
    code = ("import json, sys, recsvc.cli, recsvc.server.client\nrecsvc.cli._parser()\n"
            "print(json.dumps(sorted(sys.modules)))")  # fmt: skip
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))  # fmt: skip
    heavy = {"recsvc.server.app", "recsvc.pipeline", "recsvc.server.servicer", "pyarrow", "pandas", "faiss", "torch",
             "redis", "onnxruntime", "tritonclient"}  # fmt: skip
    assert not heavy & loaded, heavy & loaded


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_seed_shows_progress_on_a_terminal(tmp_path: Path, tiny_dataset: Dataset,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    interactions, _ = _write_files(tiny_dataset, tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["seed", "--interactions", str(interactions), "--data-dir", str(tmp_path / "var")]) == 0
    assert re.search(r"seeding: .*/7.82k .*events/s", terminal.getvalue()), terminal.getvalue()


def test_the_blend_learns_on_the_hold_out_protocols_shape_unless_told() -> None:
    import argparse

    from recsvc.cli.training import validation_carve

    def ns(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"validation_fraction": None, "test_fraction": None, "test_per_user": None, **kw})

    assert validation_carve(ns()) == {"validation_per_user": 5}
    assert validation_carve(ns(test_per_user=3)) == {"validation_per_user": 3}
    assert validation_carve(ns(test_fraction=0.2)) == {"validation_fraction": 0.2}
    assert validation_carve(ns(test_fraction=0.2, validation_fraction=0.1)) == {"validation_fraction": 0.1}


@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_evaluate_and_compress_check_the_bundle_first(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """As publish does: a damaged bundle would be measured as it is, or fail inside ONNX Runtime."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    embeddings = damaged / "item_embeddings.npy"
    data = bytearray(embeddings.read_bytes())
    data[-8:] = bytes(8)
    embeddings.write_bytes(bytes(data))
    assert main([command, str(damaged)]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc {command}: bundle {damaged}: item_embeddings.npy checksum ")
    shutil.copyfile(tiny_bundle / "item_embeddings.npy", embeddings)
    (damaged / "ranker.onnx").unlink()
    assert main([command, str(damaged)]) == 2
    assert "file ranker.onnx is missing" in capsys.readouterr().err
    # A catalog update keeps its parent's models; its added items have no interactions in the data.
    update = tmp_path / "update"
    shutil.copytree(tiny_bundle, update)
    update_extra(update, {"catalog_update": {"parent": "0123456789ab", "added": 1}})
    assert main([command, str(update)]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc {command}: {update} is a catalog update (recsvc update-catalog)"
                    " of the bundle whose manifest checksum starts 0123456789ab")  # fmt: skip
    if command == "evaluate":
        assert main([command, str(tiny_bundle), "--k", "21"]) == 2
        _one_error_line(capsys.readouterr().err, "recsvc evaluate: --k 21: more than the 20 candidates the bundle "
                        "ranks")  # fmt: skip
    (tmp_path / "afile").write_text("x")
    assert main([command, str(tmp_path / "afile")]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc {command}: {tmp_path / 'afile'} is not a bundle: a bundle is a "
                    "directory")  # fmt: skip


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "0"], ["train", "--ranker-epochs", "-1"], ["evaluate", "B", "--eval-users", "0"],
    ["compress", "B", "--eval-users", "-5"], ["compress", "B", "--prune-fraction", "1.5"],
    ["compress", "B", "--distill-epochs", "0"],
])  # fmt: skip
def test_counts_and_fractions_out_of_range_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    flag = next(a for a in argv if a.startswith("--"))
    _one_error_line(capsys.readouterr().err.splitlines()[-1], f"recsvc {argv[0]}: argument {flag}: expected ")


@pytest.mark.parametrize("argv", [["recommend", "u1", "--target", "127.0.0.1:99999"],
                                  ["bench", "--target", "127.0.0.1:99999", "--concurrency", "1"]])  # fmt: skip
def test_a_target_port_out_of_range_is_refused_not_wrapped(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc {argv[0]}: --target: port 99999 of '127.0.0.1:99999' is not "
                    "in 1..65535")  # fmt: skip


def test_train_does_not_overwrite_a_bundle(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    assert main(["train", "--dataset", "synthetic", "--synthetic-users", "50", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, f"recsvc train: --out {out} already holds a bundle; a bundle is "
                    "written once")  # fmt: skip
    assert (out / "manifest.json").read_bytes() == before


def test_the_commands_up_prints_survive_a_shell_with_a_shops_ids() -> None:
    """Copied into a shell, each printed command gets the ids whole (spaces, quotes, unicode)."""
    import shlex

    from recsvc.cli.serving import how_to_query

    user, item = "user 2's \"café\"", "SKU 12"
    lines = [line.strip() for line in how_to_query("127.0.0.1:50051", user, item).splitlines() if line.strip()]
    grpcurl, recommend, record = (shlex.split(line) for line in lines[1:4])
    assert json.loads(grpcurl[3]) == {"user_id": user, "k": 5}
    assert recommend[:3] == [".venv/bin/recsvc", "recommend", user]
    assert record[:4] == [".venv/bin/recsvc", "record", user, item]


def test_titles_come_from_the_version_that_answered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsvc.cli._common import version_catalog

    settings = Settings(model_repository=tmp_path / "repo")
    for version, title in (("1", "Old hat"), ("2", "New hat")):
        folder = tmp_path / "repo" / settings.triton_model / version / "bundle"
        folder.mkdir(parents=True)
        pd.DataFrame({"item_id": ["h"], "title": [title], "category": ["hats"]}).to_parquet(folder / "items.parquet")
    assert version_catalog(settings, "1").title("h") == "Old hat"      # not the newest version's
    assert version_catalog(settings, "2").title("h") == "New hat"
    assert version_catalog(settings, "") is None                       # no version named, none complete
    assert version_catalog(settings, "7") is None
    assert "(no titles: model version 7 is not in " in capsys.readouterr().err


def test_record_takes_the_event_type_in_any_case_as_files_do() -> None:
    assert _parser().parse_args(["record", "u1", "i1", "--type", "CART"]).type == "cart"
