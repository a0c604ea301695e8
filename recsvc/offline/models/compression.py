"""Compressed variants of a bundle's ranker, compared on quality, latency, throughput and size on disk.

Every variant keeps the bundle's ranker interface (HISTORY int64 [B, L], CANDIDATES int64 [B, C] ->
SCORES float32 [B, C], padding -> PADDING_SCORE), so any of them can stand in for ranker.onnx::

    fp32         the bundle's ranker.onnx as trained: the reference
    fp16         weights and compute in float16; inputs and SCORES keep their types (ONNX Runtime's converter;
                 its CPU provider casts most ops back to float32, so this is a GPU format)
    int8         dynamic quantization: MatMul/Gemm weights and the embedding tables stored as int8,
                 activations quantized per call (ONNX Runtime's quantize_dynamic)
    int8-static  static QDQ quantization of MatMul/Gemm/Gather, activation ranges calibrated on samples.npz
    distilled    a smaller RankerNet (its own small retrieval tower included) trained to reproduce the
                 teacher's softmax over the retrieval candidates of every training example
    pruned       structured pruning of the trained ranker: the least important embedding dimensions and
                 MLP hidden units (smallest L2 norms) removed, the layers made smaller, then fine-tuned
                 by distillation from the unpruned ranker (its retrieval tower is kept as it is)

Quality is ``evaluate_bundle`` with the variant swapped in for ranker.onnx: recall@k and NDCG@k of the
reranked retrieval candidates on the time split, and candidate AUC (see ``EvalReport``). Speed is ONNX
Runtime on CPU with the served session options (``make_session``: one intra-op thread, no spinning, as
the CPU Triton model also defaults to): p50/p99 latency of one request (B=1, C candidates) and rows
per second at batch 64, both on the bundle's samples.npz rows, variants interleaved within every
repetition and the medians over repetitions reported.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import orjson
import torch
import torch.nn.functional as F

from recsvc.bundle import Manifest, read_manifest
from recsvc.errors import BundleError, ConfigError
from recsvc.offline.data import Dataset
from recsvc.offline.models.evaluate import evaluate_bundle
from recsvc.offline.models.export import export_ranker
from recsvc.offline.models.ranker import RankerNet
from recsvc.offline.models.retrieval import RetrievalNet
from recsvc.offline.models.train import history_matrix
from recsvc.ranking.onnx_ranker import make_session

__all__ = [
    "VARIANTS",
    "BenchConfig",
    "CompressionReport",
    "DistillConfig",
    "PruneConfig",
    "Timing",
    "VariantResult",
    "benchmark",
    "compress",
    "distill_ranker",
    "load_ranker",
    "load_samples",
    "prune_ranker",
    "rank_correlation",
    "write_fp16",
    "write_int8",
]

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8", "int8-static", "distilled", "pruned")

_Ints = npt.NDArray[np.int64]
_Samples = Mapping[str, _Ints]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The student's size and how it is trained; the defaults distil MovieLens in about 70 s on 2 cores."""

    dim: int = 16                   # item embedding width of the student's ranker and retrieval tower
    hidden: int = 32                # width of the student's first MLP layer
    epochs: int = 4
    batch_size: int = 512
    lr: float = 5e-3
    temperature: float = 1.0
    max_examples: int = 100_000     # training examples whose teacher scores are precomputed
    seed: int = 0
    # One thread: a step of so small a student is too little work to split, and on a shared 2-core machine
    # two threads made distillation several times slower than one (they wait on each other whenever a
    # core is busy).
    threads: int = 1


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """How much of the ranker is pruned and how it is fine-tuned afterwards (by distillation from itself)."""

    fraction: float = 0.5           # share of the ranker's embedding dimensions and MLP hidden units removed
    epochs: int = 2                 # fine-tuning epochs
    batch_size: int = 512
    lr: float = 2e-3
    temperature: float = 1.0
    max_examples: int = 100_000
    seed: int = 0
    threads: int = 1                # see DistillConfig.threads


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How long each variant is timed; every repetition times every variant once, in a rotated order."""

    repetitions: int = 15
    requests: int = 500             # B=1 requests per variant and repetition
    batch_size: int = 64
    batches: int = 32               # batches of ``batch_size`` per variant and repetition
    warmup: int = 20


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Medians over repetitions of one variant's p50/p99 single-request latency and batched throughput."""

    p50_ms: float
    p99_ms: float
    rows_per_s: float


@dataclass(frozen=True, kw_only=True)
class VariantResult:
    """One variant: its file, size, quality on the time split, agreement with fp32 and speed."""

    name: str
    path: Path
    size_bytes: int
    recall: float
    ndcg: float
    ndcg_delta: float               # NDCG minus fp32's, over the same users
    ndcg_delta_se: float            # standard error of that difference, paired by user
    auc: float
    rank_corr: float                # mean per-row Spearman correlation of SCORES with fp32 on samples.npz
    timing: Timing


@dataclass(frozen=True, kw_only=True)
class CompressionReport:
    """Every variant of one bundle's ranker, with retrieval alone as the floor a ranker must beat."""

    bundle: str
    k: int
    users: int                      # test users behind recall and NDCG
    auc_users: int                  # test users with a held-out item among their candidates (behind AUC)
    samples: int                    # samples.npz rows the speed and rank correlation are measured on
    num_candidates: int
    retrieval: dict[str, float]     # recall, ndcg, ndcg_delta, ndcg_delta_se, auc of retrieval order alone
    variants: tuple[VariantResult, ...]
    distill: DistillConfig
    bench: BenchConfig

    def variant(self, name: str) -> VariantResult:
        """The row of variant ``name``."""
        for row in self.variants:
            if row.name == name:
                return row
        raise KeyError(name)

    def table(self) -> str:
        """A Markdown table: a row per variant; speed and size also as ratios to fp32."""
        base = self.variant("fp32")
        k = self.k
        lines = [
            f"| variant | size KiB | NDCG@{k} | ΔNDCG vs fp32 ± SE | recall@{k} | AUC | Spearman vs fp32 "
            f"| p50 ms (B=1) | p99 ms (B=1) | rows/s (B={self.bench.batch_size}) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.variants:
            t = row.timing
            lines.append(
                f"| {row.name} | {row.size_bytes / 1024:,.0f} ({row.size_bytes / base.size_bytes:.2f}x) "
                f"| {row.ndcg:.4f} | {row.ndcg_delta:+.4f} ± {row.ndcg_delta_se:.4f} | {row.recall:.4f} "
                f"| {row.auc:.4f} | {row.rank_corr:.4f} "
                f"| {t.p50_ms:.3f} ({t.p50_ms / base.timing.p50_ms:.2f}x) "
                f"| {t.p99_ms:.3f} ({t.p99_ms / base.timing.p99_ms:.2f}x) "
                f"| {t.rows_per_s:,.0f} ({t.rows_per_s / base.timing.rows_per_s:.2f}x) |"
            )
        r = self.retrieval
        lines.append(f"| retrieval only (no ranker) | - | {r['ndcg']:.4f} | {r['ndcg_delta']:+.4f} ± "
                     f"{r['ndcg_delta_se']:.4f} | {r['recall']:.4f} | {r['auc']:.4f} | - | - | - | - |")  # fmt: skip
        return "\n".join(lines)

    def to_json(self) -> bytes:
        """The whole report as indented JSON (paths as strings)."""
        return orjson.dumps(asdict(self), default=str, option=orjson.OPT_INDENT_2)


# ------------------------------------------------------------------------------------- variants
def write_fp16(src: Path, dst: Path) -> None:
    """Convert ``src`` to float16 weights and compute; HISTORY/CANDIDATES stay int64 and SCORES float32.

    Keeping the I/O types means callers (the server, Triton's config) need not change; PADDING_SCORE
    (-1e4) is representable in float16, so padding still scores as specified.
    """
    # Imported here: onnxruntime.transformers is large and only this variant needs it.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


class _SampleReader:
    """Calibration batches of samples.npz rows; quantize_static accepts anything with ``get_next``."""

    def __init__(self, samples: _Samples, rows: int, batch: int) -> None:
        n = min(rows, len(samples["HISTORY"]))
        self._batches: Iterator[dict[str, _Ints]] = iter(
            [{name: np.ascontiguousarray(samples[name][lo : lo + batch]) for name in ("HISTORY", "CANDIDATES")}
             for lo in range(0, n, batch)]
        )  # fmt: skip

    def get_next(self) -> dict[str, _Ints] | None:
        return next(self._batches, None)


class _OnlyWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def write_int8(
    src: Path, dst: Path, *, method: Literal["dynamic", "static"] = "dynamic", samples: _Samples | None = None,
    calibration_rows: int = 256,
) -> None:  # fmt: skip
    """Quantize ``src`` to int8 weights.

    ``dynamic`` stores MatMul/Gemm weights and the embedding tables (Gather) as int8 and quantizes
    activations per call from their observed range. ``static`` fixes activation ranges from
    ``calibration_rows`` rows of ``samples`` (QDQ format) and quantizes only MatMul, Gemm and Gather:
    the elementwise ops include the attention mask, whose -1e4 shares a tensor with the real logits, so
    one int8 scale for that tensor would step by about 40 and flatten the attention.
    """
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Shape inference and graph optimisation first, as ONNX Runtime recommends (it warns otherwise). On the
    # MovieLens ranker it changed neither the scores nor the speed measurably; graphs with more fusable
    # patterns gain from it.
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    # The quantizer logs a line per tensor at INFO on the root logger itself; a filter on the root logger
    # sees only records made there, so recsvc's own INFO logs still pass.
    quiet = _OnlyWarnings()
    logging.getLogger().addFilter(quiet)
    try:
        quant_pre_process(str(src), str(prepared))
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(dst))
        elif method == "static":
            if samples is None:
                raise ConfigError("static int8 quantization needs samples for calibration")
            quantize_static(
                str(prepared), str(dst), _SampleReader(samples, calibration_rows, 32),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            )  # fmt: skip
        else:
            raise ConfigError(f"unknown int8 method {method!r}: dynamic or static")
    finally:
        logging.getLogger().removeFilter(quiet)
        prepared.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- distillation
def _model_items(manifest: Manifest) -> int:
    # A catalog update adds items the models do not know; they borrow a trained proxy's id.
    return int(manifest.extra.get("model_items", manifest.num_items))


def _teacher_targets(
    bundle: Path, train: Dataset, manifest: Manifest, config: DistillConfig | PruneConfig, rng: np.random.Generator,
) -> tuple[_Ints, _Ints, npt.NDArray[np.int32], npt.NDArray[np.float32]]:  # fmt: skip
    """Training examples (history start/end), their retrieval candidates and the teacher's scores of them.

    The candidates are what the bundle's retrieval serves for that history, minus the history's items,
    as in ranker training: the student only ever has to order those, so that is what it is taught.
    """
    flat = train.items.astype(np.int64)
    user_starts = np.searchsorted(train.users, np.arange(train.num_users), side="left")
    ends = np.arange(len(flat), dtype=np.int64)
    if len(ends) > config.max_examples:
        ends = np.sort(rng.choice(ends, config.max_examples, replace=False))
    starts = user_starts[train.users[ends]].astype(np.int64)
    embeddings = np.load(bundle / "item_embeddings.npy")[: _model_items(manifest)]
    encoder = make_session(bundle / "query_encoder.onnx", intra_op_threads=config.threads)
    teacher = make_session(bundle / "ranker.onnx", intra_op_threads=config.threads)
    c = min(manifest.num_candidates, embeddings.shape[0])
    candidates = np.full((len(ends), manifest.num_candidates), -1, dtype=np.int32)
    scores = np.full((len(ends), manifest.num_candidates), -1e4, dtype=np.float32)
    for lo in range(0, len(ends), 512):
        history = history_matrix(flat, starts[lo : lo + 512], ends[lo : lo + 512], manifest.history_len)
        sim = encoder.run(["QUERY"], {"HISTORY": history})[0] @ embeddings.T
        rows, cols = np.nonzero(history >= 0)
        sim[rows, history[rows, cols]] = -np.inf
        top = np.argpartition(-sim, c - 1, axis=1)[:, :c].astype(np.int64)
        padded = np.full((len(history), manifest.num_candidates), -1, dtype=np.int64)
        padded[:, :c] = top
        candidates[lo : lo + 512] = padded
        scores[lo : lo + 512] = teacher.run(["SCORES"], {"HISTORY": history, "CANDIDATES": padded})[0]
    return starts, ends, candidates, scores


def distill_ranker(
    bundle: Path, train: Dataset, config: DistillConfig = DistillConfig(),
    *, on_epoch: Callable[[int, float], None] | None = None,
) -> RankerNet:  # fmt: skip
    """Train a small RankerNet to reproduce the bundle's ranker on the retrieval candidates of ``train``.

    The loss is the KL divergence from the teacher's softmax over each example's candidates to the
    student's: ranking only depends on score differences within a request, which the softmax keeps and
    a per-score MSE would over-constrain. The student gets its own ``config.dim``-wide retrieval tower,
    trained with the rest, because the teacher's embedded retrieval net is most of its size.
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # layer initialisers draw from torch's default generator
    rng = np.random.default_rng(config.seed)
    manifest = read_manifest(bundle)
    starts, ends, candidates, targets = _teacher_targets(bundle, train, manifest, config, rng)
    flat = train.items.astype(np.int64)

    student = RankerNet(RetrievalNet(_model_items(manifest), config.dim, manifest.history_len), dim=config.dim,
                        hidden=config.hidden)  # fmt: skip
    # RankerNet freezes its retrieval net because the teacher's is pretrained; the student's is not.
    for p in student.retrieval.parameters():
        p.requires_grad_(True)
    return _fit_to_teacher(student, flat, (starts, ends, candidates, targets), manifest, config, rng, on_epoch)


_Teacher = tuple[_Ints, _Ints, npt.NDArray[np.int32], npt.NDArray[np.float32]]


def _fit_to_teacher(
    student: RankerNet, flat: _Ints, teacher: _Teacher, manifest: Manifest, config: DistillConfig | PruneConfig,
    rng: np.random.Generator, on_epoch: Callable[[int, float], None] | None, what: str = "distillation",
) -> RankerNet:  # fmt: skip
    """Train ``student``'s trainable parameters to reproduce the teacher's softmax over each example's candidates.

    The loss is the KL divergence from the teacher's softmax to the student's: ranking only depends on
    score differences within a request, which the softmax keeps and a per-score MSE would over-constrain.
    """
    starts, ends, candidates, targets = teacher
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    temperature = config.temperature
    student.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(ends))
        batches = np.array_split(order, max(1, len(order) // config.batch_size))
        total = 0.0
        for batch in batches:
            history = torch.from_numpy(history_matrix(flat, starts[batch], ends[batch], manifest.history_len))
            logits = student(history, torch.from_numpy(candidates[batch].astype(np.int64)))
            target = torch.from_numpy(targets[batch])
            # Padded candidates score -1e4 in both: probability ~0 on both sides, finite log-probabilities.
            loss = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.log_softmax(target / temperature, dim=-1),
                            log_target=True, reduction="batchmean") * temperature**2  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
        log.info("%s epoch %d/%d KL %.4f", what, epoch + 1, config.epochs, total / len(batches))
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(batches))
    student.eval()
    return student


def load_ranker(bundle: Path, manifest: Manifest) -> RankerNet:
    """The bundle's trained ranker as a torch module, from its TorchScript twin (ranker.pt)."""
    path = bundle / "ranker.pt"
    if not path.is_file():
        raise BundleError(f"{bundle} has no ranker.pt (bundles from `recsvc train` before the gpu-torch target "
                          "lack it): pruning needs the trained weights; retrain the bundle")  # fmt: skip
    train_config = manifest.extra.get("train_config") or {}
    traced = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    state = traced.state_dict()
    hidden = int(state["mlp.0.weight"].shape[0])
    retrieval = RetrievalNet(_model_items(manifest), int(train_config.get("dim", manifest.dim)), manifest.history_len)
    ranker = RankerNet(retrieval, dim=int(state["item_embedding.weight"].shape[1]), hidden=hidden)
    ranker.load_state_dict(state)
    ranker.eval()
    return ranker


def _linear(module: torch.nn.Module) -> torch.nn.Linear:
    assert isinstance(module, torch.nn.Linear), module
    return module


def prune_ranker(
    bundle: Path, train: Dataset, config: PruneConfig = PruneConfig(),
    *, on_epoch: Callable[[int, float], None] | None = None,
) -> RankerNet:  # fmt: skip
    """Structured pruning of the bundle's ranker, fine-tuned on ``train`` by distillation from the unpruned one.

    Removed: the ``config.fraction`` of embedding dimensions whose item-embedding columns have the
    smallest L2 norm (with their rows and columns of the attention matrix and their four columns of the
    first MLP layer's input), and the same fraction of each hidden MLP layer's units with the smallest
    incoming-weight norms. The attention weights are rescaled by sqrt(new dim / dim), which keeps the
    attention logits as the 1/sqrt(dim) scaling saw them. The embedded retrieval tower is kept frozen.
    """
    if not 0 < config.fraction < 1:
        raise ConfigError(f"prune fraction must be in (0, 1), got {config.fraction}")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    manifest = read_manifest(bundle)
    teacher = load_ranker(bundle, manifest)
    first, second, last = (_linear(teacher.mlp[i]) for i in (0, 2, 4))
    dim, hidden = teacher.dim, first.out_features
    keep_dim = max(1, round(dim * (1 - config.fraction)))
    keep_hidden = max(2, 2 * round(hidden * (1 - config.fraction) / 2))     # even: the next layer is half of it

    def strongest(norms: torch.Tensor, n: int) -> torch.Tensor:
        return torch.sort(torch.topk(norms, n).indices).values

    with torch.no_grad():
        dims = strongest(teacher.item_embedding.weight.norm(dim=0), keep_dim)
        cols = torch.cat([dims + block * dim for block in range(4)])
        units = strongest(first.weight[:, cols].norm(dim=1), keep_hidden)
        units2 = strongest(second.weight[:, units].norm(dim=1), keep_hidden // 2)
        student = RankerNet(teacher.retrieval, dim=keep_dim, hidden=keep_hidden)
        student.retrieval_scale.copy_(teacher.retrieval_scale)
        student.item_bias.weight.copy_(teacher.item_bias.weight)
        student.item_embedding.weight.copy_(teacher.item_embedding.weight[:, dims])
        student.attention.weight.copy_(teacher.attention.weight[dims][:, dims] * math.sqrt(keep_dim / dim))
        s_first, s_second, s_last = (_linear(student.mlp[i]) for i in (0, 2, 4))
        s_first.weight.copy_(first.weight[units][:, cols])
        s_first.bias.copy_(first.bias[units])
        s_second.weight.copy_(second.weight[units2][:, units])
        s_second.bias.copy_(second.bias[units2])
        s_last.weight.copy_(last.weight[:, units2])
        s_last.bias.copy_(last.bias)
    log.info("pruned the ranker: embedding dims %d -> %d, hidden units %d -> %d, %d -> %d", dim, keep_dim,
             hidden, keep_hidden, hidden // 2, keep_hidden // 2)  # fmt: skip
    targets = _teacher_targets(bundle, train, manifest, config, rng)
    return _fit_to_teacher(student, train.items.astype(np.int64), targets, manifest, config, rng, on_epoch,
                           what="pruning fine-tune")  # fmt: skip


# ----------------------------------------------------------------------------------------- speed
def load_samples(bundle: Path) -> dict[str, _Ints]:
    """The bundle's samples.npz: real ranker inputs HISTORY [N, L] and CANDIDATES [N, C], int64."""
    path = bundle / "samples.npz"
    if not path.is_file():
        raise BundleError(f"{bundle} has no samples.npz (bundles from before it was added): retrain it")
    with np.load(path) as data:
        return {name: np.ascontiguousarray(data[name], dtype=np.int64) for name in ("HISTORY", "CANDIDATES")}


def benchmark(
    paths: Mapping[str, Path], samples: _Samples, config: BenchConfig = BenchConfig(),
    *, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:  # fmt: skip
    """Time each ONNX file on ``samples`` with ONNX Runtime CPU, one intra-op thread.

    Variants take turns within every repetition, starting one further along each time, so a slow
    spell of a shared machine lands on all of them rather than on whichever ran then; the medians over
    repetitions are reported.
    """
    history, candidates = samples["HISTORY"], samples["CANDIDATES"]
    n = len(history)
    if n == 0:
        raise ConfigError("no sample rows to benchmark on")
    singles = [{"HISTORY": history[i : i + 1], "CANDIDATES": candidates[i : i + 1]} for i in range(n)]
    bs = min(config.batch_size, n)
    batches = [{"HISTORY": history[lo : lo + bs], "CANDIDATES": candidates[lo : lo + bs]}
               for lo in range(0, n - bs + 1, bs)]  # fmt: skip
    # The served session options (one intra-op thread, no spinning), so the figures are the served ranker's.
    sessions = {name: make_session(path, intra_op_threads=1) for name, path in paths.items()}
    for session in sessions.values():
        for i in range(config.warmup):
            session.run(["SCORES"], singles[i % n])
        session.run(["SCORES"], batches[0])
    names = list(sessions)
    p50: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    rate: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(config.repetitions):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            run = sessions[name].run
            latencies = []
            for i in range(config.requests):
                feed = singles[(rep * config.requests + i) % n]
                t0 = clock()
                run(["SCORES"], feed)
                latencies.append(clock() - t0)
            t0 = clock()
            for i in range(config.batches):
                run(["SCORES"], batches[i % len(batches)])
            rate[name].append(config.batches * bs / max(clock() - t0, 1e-12))
            p50[name].append(float(np.percentile(latencies, 50)) * 1e3)
            p99[name].append(float(np.percentile(latencies, 99)) * 1e3)
    return {name: Timing(p50_ms=float(np.median(p50[name])), p99_ms=float(np.median(p99[name])),
                         rows_per_s=float(np.median(rate[name]))) for name in names}  # fmt: skip


def rank_correlation(a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]]) -> float:
    """Mean over rows of the Spearman correlation between two score matrices [N, C] (ties broken by position)."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ConfigError(f"rank correlation needs two equal [N, C>=2] matrices, got {a.shape} and {b.shape}")
    ra = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1, kind="stable"), axis=1).astype(np.float64)
    # Both rows are permutations of 0..C-1, so Spearman is 1 - 6 sum d^2 / (C (C^2 - 1)) exactly.
    c = a.shape[1]
    rho = 1.0 - 6.0 * ((ra - rb) ** 2).sum(axis=1) / (c * (c * c - 1))
    return float(rho.mean())


# ---------------------------------------------------------------------------------------- report
def _paired_delta(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same users and its standard error.

    Paired because most users score the same under both models: the spread of the per-user differences,
    not of the scores, says whether a change in the mean is more than which users happen to be held out.
    """
    diff = a - b
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, 0.0
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def _remove_outputs(out_dir: Path) -> None:
    """What ``compress`` writes into its folder (the variants and the report), nothing else."""
    for path in [*out_dir.glob("ranker.*.onnx"), out_dir / "report.json", out_dir / "report.md"]:
        path.unlink(missing_ok=True)


def compress(
    bundle: Path,
    train: Dataset,
    test: Mapping[int, npt.NDArray[np.integer[Any]]],
    out_dir: Path,
    *,
    variants: Sequence[str] = VARIANTS,
    k: int = 10,
    max_users: int | None = None,
    distill: DistillConfig = DistillConfig(),
    prune: PruneConfig = PruneConfig(),
    bench: BenchConfig = BenchConfig(),
    clock: Callable[[], float] = time.perf_counter,
) -> CompressionReport:
    """Write ``variants`` of ``bundle``'s ranker to ``out_dir``, measure them, write report.json and report.md.

    ``train`` and ``test`` are the time split the bundle was trained on (its train part); the
    distilled student learns from ``train`` only. ``fp32`` is always included: it is every ratio's base.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    manifest = read_manifest(bundle)
    samples = load_samples(bundle)
    if "pruned" in variants and not (bundle / "ranker.pt").is_file():
        # Before anything is built: pruning starts from the trained weights, which only ranker.pt holds.
        raise BundleError(f"{bundle} has no ranker.pt (bundles from `recsvc train` before the gpu-torch target "
                          "lack it): the pruned variant needs the trained weights; leave it out of the variants "
                          "or retrain the bundle")  # fmt: skip
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The folder holds one run's variants and report: an earlier run's go first (a variant not asked for
    # this time would sit beside a report that does not list it), and this run's if it fails.
    _remove_outputs(out_dir)
    try:
        src = bundle / "ranker.onnx"
        builders: dict[str, Callable[[Path], object]] = {
            "fp32": lambda dst: shutil.copyfile(src, dst),
            "fp16": lambda dst: write_fp16(src, dst),
            "int8": lambda dst: write_int8(src, dst, method="dynamic"),
            "int8-static": lambda dst: write_int8(src, dst, method="static", samples=samples),
            "distilled": lambda dst: export_ranker(distill_ranker(bundle, train, distill), manifest.history_len,
                                                   manifest.num_candidates, dst),
            "pruned": lambda dst: export_ranker(prune_ranker(bundle, train, prune), manifest.history_len,
                                                manifest.num_candidates, dst),
        }  # fmt: skip
        paths = {name: out_dir / f"ranker.{name}.onnx" for name in VARIANTS if name == "fp32" or name in variants}
        for name, path in paths.items():
            log.info("writing the %s variant to %s", name, path)
            builders[name](path)

        log.info("evaluating %d variants on the time split", len(paths))
        reports = {name: evaluate_bundle(bundle, train, test, k=k, max_users=max_users, ranker=path)
                   for name, path in paths.items()}  # fmt: skip
        scores = {name: make_session(path, intra_op_threads=2).run(["SCORES"], dict(samples))[0]
                  for name, path in paths.items()}  # fmt: skip
        log.info("timing %d variants on %d sample rows", len(paths), len(samples["HISTORY"]))
        timings = benchmark(paths, samples, bench, clock=clock)

        ranked = "retrieval+ranking"
        base = reports["fp32"]
        deltas = {name: _paired_delta(r.user_ndcg[ranked], base.user_ndcg[ranked]) for name, r in reports.items()}
        rows = tuple(
            VariantResult(name=name, path=path, size_bytes=path.stat().st_size, recall=reports[name].recall[ranked],
                          ndcg=reports[name].ndcg[ranked], ndcg_delta=deltas[name][0], ndcg_delta_se=deltas[name][1],
                          auc=reports[name].auc[ranked], rank_corr=rank_correlation(scores[name], scores["fp32"]),
                          timing=timings[name])
            for name, path in paths.items()
        )  # fmt: skip
        floor = _paired_delta(base.user_ndcg["retrieval"], base.user_ndcg[ranked])
        report = CompressionReport(
            bundle=str(bundle), k=k, users=base.users, auc_users=base.auc_users, samples=len(samples["HISTORY"]),
            num_candidates=manifest.num_candidates,
            retrieval={"recall": base.recall["retrieval"], "ndcg": base.ndcg["retrieval"], "ndcg_delta": floor[0],
                       "ndcg_delta_se": floor[1], "auc": base.auc["retrieval"]},
            variants=rows, distill=distill, bench=bench,
        )  # fmt: skip
        (out_dir / "report.json").write_bytes(report.to_json())
        (out_dir / "report.md").write_text(report.table() + "\n", encoding="utf-8")
    except BaseException:
        _remove_outputs(out_dir)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return report
