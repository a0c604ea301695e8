"""Compressed ranker variants: same interface, scores close to FP32, a smaller student, a complete report."""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from recsvc.bundle import PADDING_SCORE
from recsvc.offline.bench import compression as cli
from recsvc.offline.data import Dataset, time_split
from recsvc.offline.models.compression import (
    VARIANTS,
    BenchConfig,
    CompressionReport,
    DistillConfig,
    PruneConfig,
    benchmark,
    compress,
    load_ranker,
    load_samples,
    prune_ranker,
    rank_correlation,
)
from recsvc.offline.models.evaluate import evaluate_bundle

# Small enough that building, evaluating and timing all five variants of the tiny bundle takes seconds.
TINY_DISTILL = DistillConfig(dim=8, hidden=16, epochs=4, batch_size=128, lr=1e-2, threads=1)
TINY_BENCH = BenchConfig(repetitions=2, requests=20, batches=2, warmup=2)
TINY_PRUNE = PruneConfig(fraction=0.5, epochs=2, batch_size=128, lr=1e-2, threads=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_dataset: Dataset) -> CompressionReport:
    split = time_split(tiny_dataset)
    out = tmp_path_factory.mktemp("compressed")
    return compress(tiny_bundle, split.train, split.test, out, distill=TINY_DISTILL, prune=TINY_PRUNE,
                    bench=TINY_BENCH)  # fmt: skip


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _scores(path: Path, samples: dict[str, np.ndarray]) -> np.ndarray:
    out: np.ndarray = _session(path).run(["SCORES"], samples)[0]
    return out


def test_every_variant_keeps_the_ranker_interface(report: CompressionReport, tiny_bundle: Path) -> None:
    reference = _session(tiny_bundle / "ranker.onnx")
    signature = [(t.name, t.type, len(t.shape)) for t in [*reference.get_inputs(), *reference.get_outputs()]]
    assert signature == [("HISTORY", "tensor(int64)", 2), ("CANDIDATES", "tensor(int64)", 2),
                         ("SCORES", "tensor(float)", 2)]  # fmt: skip
    for row in report.variants:
        session = _session(row.path)
        assert [(t.name, t.type, len(t.shape)) for t in [*session.get_inputs(), *session.get_outputs()]] == signature


def test_every_variant_scores_padding_as_specified(report: CompressionReport, tiny_bundle: Path) -> None:
    samples = load_samples(tiny_bundle)
    history, candidates = samples["HISTORY"][:3].copy(), samples["CANDIDATES"][:3].copy()
    candidates[:, -4:] = -1
    history[1] = -1                      # an empty history must still score
    for row in report.variants:
        scores = _session(row.path).run(["SCORES"], {"HISTORY": history, "CANDIDATES": candidates})[0]
        assert scores.dtype == np.float32 and scores.shape == candidates.shape
        assert (scores[:, -4:] == PADDING_SCORE).all(), row.name
        assert np.isfinite(scores).all() and (scores[:, :-4] > PADDING_SCORE / 2).all(), row.name


def test_fp32_variant_is_the_bundle_ranker(report: CompressionReport, tiny_bundle: Path) -> None:
    assert report.variant("fp32").path.read_bytes() == (tiny_bundle / "ranker.onnx").read_bytes()


def test_quantized_scores_keep_fp32_order(report: CompressionReport, tiny_bundle: Path) -> None:
    samples = load_samples(tiny_bundle)
    fp32 = _scores(tiny_bundle / "ranker.onnx", samples)
    fp16 = _scores(report.variant("fp16").path, samples)
    assert np.abs(fp16 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert rank_correlation(fp16, fp32) > 0.995
    for name in ("int8", "int8-static"):
        assert rank_correlation(_scores(report.variant(name).path, samples), fp32) > 0.95, name
    # The report's column is the same measurement.
    assert report.variant("fp16").rank_corr == pytest.approx(rank_correlation(fp16, fp32))


def test_compressed_files_are_smaller(report: CompressionReport) -> None:
    base = report.variant("fp32").size_bytes
    assert report.variant("fp16").size_bytes < 0.8 * base
    assert report.variant("int8").size_bytes < 0.8 * base
    assert report.variant("distilled").size_bytes < 0.7 * base
    for row in report.variants:
        assert row.size_bytes == row.path.stat().st_size


def test_distilled_student_learns_the_teacher(report: CompressionReport, tiny_bundle: Path) -> None:
    # A randomly initialised student orders candidates by chance (rho ~ 0); distillation must do better.
    assert report.variant("distilled").rank_corr > 0.5


def test_pruned_ranker_is_smaller_and_keeps_the_teachers_order(report: CompressionReport) -> None:
    assert report.variant("pruned").size_bytes < report.variant("fp32").size_bytes
    assert report.variant("pruned").rank_corr > 0.8


def test_pruning_removes_exactly_what_contributes_nothing(
    tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset
) -> None:
    # Zero half of the embedding dims and of each hidden layer's units: pruning must pick exactly those and,
    # before any fine-tuning, compute the same scores with half-size layers (the attention rescaling included).
    import shutil

    import torch

    from recsvc.bundle import read_manifest
    from recsvc.errors import BundleError, ConfigError
    from recsvc.offline.models.export import export_ranker_torchscript

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    teacher = load_ranker(bundle, manifest)
    dim, hidden = teacher.dim, teacher.mlp[0].out_features
    with torch.no_grad():
        gone = torch.arange(0, dim, 2)                           # every other dim
        teacher.item_embedding.weight[:, gone] = 0.0
        teacher.mlp[0].weight[: hidden // 2] = 0.0               # the first half of the units
        teacher.mlp[0].bias[: hidden // 2] = 0.0
        teacher.mlp[2].weight[hidden // 4 :] = 0.0
        teacher.mlp[2].bias[hidden // 4 :] = 0.0
    export_ranker_torchscript(teacher, manifest.history_len, manifest.num_candidates, bundle / "ranker.pt")
    student = prune_ranker(bundle, time_split(tiny_dataset).train, PruneConfig(fraction=0.5, epochs=0))
    assert (student.dim, student.mlp[0].out_features, student.mlp[2].out_features) == (dim // 2, hidden // 2,
                                                                                        hidden // 4)  # fmt: skip
    samples = load_samples(bundle)
    history, candidates = torch.from_numpy(samples["HISTORY"]), torch.from_numpy(samples["CANDIDATES"])
    with torch.no_grad():
        assert torch.allclose(student(history, candidates), teacher(history, candidates), atol=1e-5)
    with pytest.raises(ConfigError, match="prune fraction must be in"):
        prune_ranker(bundle, time_split(tiny_dataset).train, PruneConfig(fraction=1.0))
    (bundle / "ranker.pt").unlink()
    with pytest.raises(BundleError, match=r"has no ranker\.pt"):
        load_ranker(bundle, manifest)
    # compress refuses it before building anything.
    split = time_split(tiny_dataset)
    with pytest.raises(BundleError, match=r"has no ranker\.pt"):
        compress(bundle, split.train, split.test, tmp_path / "out", variants=["int8", "pruned"])
    assert not (tmp_path / "out").exists()


def test_report_has_every_variant_and_retrieval(report: CompressionReport) -> None:
    assert [row.name for row in report.variants] == list(VARIANTS)
    lines = report.table().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == [*VARIANTS, "retrieval only (no ranker)"]
    assert lines[2].count("(1.00x)") == 4        # fp32 is the base of every ratio
    for row in report.variants:
        assert 0.0 <= row.ndcg <= 1.0 and 0.0 <= row.recall <= 1.0 and 0.0 <= row.auc <= 1.0
        assert row.timing.p50_ms > 0 and row.timing.p99_ms >= row.timing.p50_ms and row.timing.rows_per_s > 0
    written = orjson.loads((report.variant("fp32").path.parent / "report.json").read_bytes())
    assert [v["name"] for v in written["variants"]] == list(VARIANTS)
    assert written["variants"][0]["timing"]["p50_ms"] == report.variant("fp32").timing.p50_ms
    assert (report.variant("fp32").path.parent / "report.md").read_text() == report.table() + "\n"


def test_report_quality_is_evaluate_bundle_with_the_variant(
    report: CompressionReport, tiny_bundle: Path, tiny_dataset: Dataset
) -> None:
    split = time_split(tiny_dataset)
    plain = evaluate_bundle(tiny_bundle, split.train, split.test)
    assert report.variant("fp32").ndcg == plain.ndcg["retrieval+ranking"]
    assert report.variant("fp32").auc == plain.auc["retrieval+ranking"]
    assert {k: report.retrieval[k] for k in ("recall", "ndcg", "auc")} == {
        "recall": plain.recall["retrieval"], "ndcg": plain.ndcg["retrieval"], "auc": plain.auc["retrieval"]}
    # Per-user NDCG: the means are the report's figures, and the paired differences are taken over them.
    assert len(plain.user_ndcg["retrieval+ranking"]) == plain.users
    assert plain.user_ndcg["retrieval+ranking"].mean() == pytest.approx(plain.ndcg["retrieval+ranking"])
    diff = plain.user_ndcg["retrieval"] - plain.user_ndcg["retrieval+ranking"]
    assert report.retrieval["ndcg_delta"] == pytest.approx(report.retrieval["ndcg"] - report.variant("fp32").ndcg)
    assert report.retrieval["ndcg_delta_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)))
    assert report.variant("fp32").ndcg_delta == 0.0 and report.variant("fp32").ndcg_delta_se == 0.0
    other = evaluate_bundle(tiny_bundle, split.train, split.test, ranker=report.variant("distilled").path)
    assert other.ndcg["retrieval+ranking"] == report.variant("distilled").ndcg
    assert other.ndcg["retrieval"] == plain.ndcg["retrieval"]           # retrieval still from the bundle
    assert 0 < plain.auc_users <= plain.users


def test_rank_correlation_values() -> None:
    a = np.array([[0.1, 0.5, 0.3, 0.9], [1.0, 2.0, 3.0, 4.0]])
    assert rank_correlation(a, a) == 1.0
    assert rank_correlation(a, -a) == -1.0
    # Row 1: ranks [0,1,2,3] vs [1,0,2,3]: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8.
    assert rank_correlation(a[1:], np.array([[2.0, 1.0, 3.0, 4.0]])) == pytest.approx(0.8)


def test_benchmark_arithmetic_with_a_fake_clock(tiny_bundle: Path) -> None:
    ticks = itertools.count()

    def clock() -> float:
        return next(ticks) * 0.001      # every reading 1 ms after the previous one

    samples = load_samples(tiny_bundle)
    config = BenchConfig(repetitions=3, requests=5, batch_size=16, batches=2, warmup=1)
    timings = benchmark({"a": tiny_bundle / "ranker.onnx", "b": tiny_bundle / "ranker.onnx"}, samples, config,
                        clock=clock)  # fmt: skip
    for timing in timings.values():
        assert timing.p50_ms == pytest.approx(1.0) and timing.p99_ms == pytest.approx(1.0)
        assert timing.rows_per_s == pytest.approx(2 * 16 / 0.001)


def test_missing_samples_is_a_bundle_error(tmp_path: Path) -> None:
    from recsvc.errors import BundleError

    with pytest.raises(BundleError, match=r"no samples\.npz"):
        load_samples(tmp_path)


def test_compress_command(
    tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    parser = argparse.ArgumentParser(prog="recsvc")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compress", str(tiny_bundle), "--out", str(tmp_path), "--quick"])
    assert args.func is cli.run_compress and args.dataset is None and args.test_per_user is None
    assert args.variants is None            # all of them (pruned only where the bundle has ranker.pt)
    # The full set is the fixture's job; here the command's plumbing (fp32 is added as the base).
    args = parser.parse_args(["compress", str(tiny_bundle), "--out", str(tmp_path), "--quick", "--variants", "int8"])
    # The tiny bundle was trained on the tiny synthetic shop, which no --dataset flag reproduces exactly.
    monkeypatch.setattr("recsvc.offline.data_options.bundle_dataset", lambda *_: tiny_dataset)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| int8 |" in out and f"variants, report.md and report.json in {tmp_path}" in out
    written = orjson.loads((tmp_path / "report.json").read_bytes())
    assert [v["name"] for v in written["variants"]] == ["fp32", "int8"]
    assert math.isfinite(written["variants"][1]["ndcg"])


def test_unknown_variant_is_refused(tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset) -> None:
    from recsvc.errors import ConfigError

    split = time_split(tiny_dataset)
    with pytest.raises(ConfigError, match="unknown variants int4"):
        compress(tiny_bundle, split.train, split.test, tmp_path, variants=["int4"])


def test_the_folder_holds_one_runs_variants_and_a_failed_run_leaves_none(
    tmp_path: Path, tiny_bundle: Path, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = time_split(tiny_dataset)
    out = tmp_path / "out"
    compress(tiny_bundle, split.train, split.test, out, variants=["int8"], bench=TINY_BENCH)
    assert sorted(p.name for p in out.iterdir()) == ["ranker.fp32.onnx", "ranker.int8.onnx", "report.json",
                                                       "report.md"]  # fmt: skip
    (out / "notes.txt").write_text("mine")
    compress(tiny_bundle, split.train, split.test, out, variants=["fp16"], bench=TINY_BENCH)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "ranker.fp16.onnx", "ranker.fp32.onnx",
                                                       "report.json", "report.md"]  # fmt: skip

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr("recsvc.offline.models.compression.evaluate_bundle", fail)
    with pytest.raises(RuntimeError):
        compress(tiny_bundle, split.train, split.test, out, variants=["int8"], bench=TINY_BENCH)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]   # what it did not write stays
    with pytest.raises(RuntimeError):
        compress(tiny_bundle, split.train, split.test, tmp_path / "new", variants=["int8"], bench=TINY_BENCH)
    assert not (tmp_path / "new").exists()
