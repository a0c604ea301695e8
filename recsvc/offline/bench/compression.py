"""``recsvc compress BUNDLE``: the bundle's ranker as FP32, FP16, INT8, a distilled student and pruned, compared.

Writes ranker.<variant>.onnx for every variant into ``--out`` (default ``BUNDLE.compressed``: beside the
bundle, so `recsvc publish` does not copy the variants along), each with the bundle's ranker interface,
then prints a Markdown table of size, quality on the time split (NDCG@10, recall@10, candidate AUC),
agreement with FP32 and ONNX Runtime CPU speed, and writes it as report.md and report.json beside them.
The time split is recomputed from the data the bundle records it was trained on (or from the data
options, for an older bundle). What each variant is and how it is measured: recsvc/offline/models/compression.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["DESCRIPTION", "QUICK_USERS", "register", "run_compress"]

# `recsvc compress --help`: what a user needs, not the module's notes.
DESCRIPTION = """\
Compare the bundle's ranker as FP32, FP16, INT8 (dynamic and static), a distilled student and pruned
(structured: embedding dims and MLP units removed, then fine-tuned).

Writes ranker.<variant>.onnx for every variant into --out (default BUNDLE.compressed), then prints a
Markdown table of size, quality on the held-out time split (NDCG@10, recall@10, candidate AUC),
agreement with FP32 and ONNX Runtime CPU speed, and writes it as report.md and report.json there.
The split is recomputed from the data the bundle was trained on; --quick is a one-minute smoke run."""

# --quick: a smoke run in about a minute on MovieLens; its figures are noisier and the student is
# under-trained, so documented tables never come from it.
QUICK_USERS = 200


def register(subparsers: Any) -> None:
    """Add the ``compress`` command to ``recsvc``'s subparsers."""
    from recsvc.offline.data_options import add_data_args, add_split_args, fraction, positive_int

    p = subparsers.add_parser("compress", help="compare the ranker as FP32, FP16, INT8, distilled and pruned: quality, "
                              "latency, throughput, size", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("bundle", type=Path, help="bundle directory whose ranker is compressed")
    add_data_args(p, default=None)
    p.add_argument("--out", type=Path, help="where the variants and the report go (default BUNDLE.compressed)")
    add_split_args(p, default_note="default: the split the bundle was trained with, else 5")
    p.add_argument("--eval-users", type=positive_int, default=20_000,
                   help="evaluate on at most this many test users")
    # The names are recsvc.offline.models.compression.VARIANTS, spelled out: importing it here would load torch.
    p.add_argument("--variants", type=lambda text: [v for v in text.split(",") if v],
                   help="comma-separated subset of fp32,fp16,int8,int8-static,distilled,pruned (fp32 is always "
                        "measured; default all, without pruned for a bundle that has no ranker.pt)")  # fmt: skip
    p.add_argument("--student-dim", type=positive_int, default=16,
                   help="embedding width of the distilled ranker (default 16)")
    p.add_argument("--student-hidden", type=positive_int, default=32,
                   help="first MLP layer width of the distilled ranker")
    p.add_argument("--distill-epochs", type=positive_int, default=4,
                   help="distillation epochs (default 4; --quick: 1)")
    p.add_argument("--prune-fraction", type=fraction, default=0.5,
                   help="share of the ranker's embedding dims and MLP hidden units pruned (default 0.5)")
    p.add_argument("--prune-epochs", type=positive_int, default=2,
                   help="fine-tuning epochs after pruning (default 2; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 1 distillation epoch on 20k examples, {QUICK_USERS} test users, short timing")
    p.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    """The ``compress`` handler: build and measure the variants, print the table; the exit code."""
    from recsvc.offline.data import time_split
    from recsvc.offline.data_options import bundle_dataset, split_protocol, trained_bundle

    # Imported here, not at the top: `recsvc --help` and every other command would otherwise pay for torch.
    from recsvc.offline.models.compression import BenchConfig, DistillConfig, PruneConfig, compress

    # The data the bundle was trained on (recorded in it), unless the options name other data.
    protocol = split_protocol(args, trained_bundle(args.bundle).extra.get("split"))
    split = time_split(bundle_dataset(args, args.bundle), **protocol)
    out = args.out if args.out is not None else args.bundle.with_name(args.bundle.name + ".compressed")
    student = {"dim": args.student_dim, "hidden": args.student_hidden}
    if args.quick:
        distill = DistillConfig(**student, epochs=1, max_examples=20_000)
        prune = PruneConfig(fraction=args.prune_fraction, epochs=1, max_examples=20_000)
        bench = BenchConfig(repetitions=3, requests=200, batches=8)
        users = min(args.eval_users, QUICK_USERS)
    else:
        distill = DistillConfig(**student, epochs=args.distill_epochs)
        prune = PruneConfig(fraction=args.prune_fraction, epochs=args.prune_epochs)
        bench, users = BenchConfig(), args.eval_users
    variants = args.variants
    if variants is None:
        variants = ["fp32", "fp16", "int8", "int8-static", "distilled", "pruned"]
        if not (args.bundle / "ranker.pt").is_file():
            variants.remove("pruned")
            sys.stderr.write(f"{args.bundle} has no ranker.pt (an older bundle): the pruned variant is left out\n")
    report = compress(args.bundle, split.train, split.test, out, variants=variants, max_users=users,
                      distill=distill, prune=prune, bench=bench)  # fmt: skip
    sys.stdout.write(
        f"{args.bundle}: {report.users} test users ({report.auc_users} with a held-out item among the "
        f"{report.num_candidates} candidates: AUC), speed on {report.samples} sample rows, ONNX Runtime CPU, "
        "1 intra-op thread\n\n" + report.table() + f"\n\nvariants, report.md and report.json in {out}\n"
    )  # fmt: skip
    return 0
