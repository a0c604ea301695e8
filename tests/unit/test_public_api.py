"""Every module's public API is exactly its __all__, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil
import re

import recsvc

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(recsvc.__path__, "recsvc.")
    if not m.name.startswith("recsvc.v1") and m.name != "recsvc.repository.ranker_model"
    and not m.name.endswith(".__main__")          # running it is its only job
)  # fmt: skip


def test_every_module_declares_all_and_exports_exist() -> None:
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "__all__"):
            missing.append(f"{name}: no __all__")
            continue
        missing += [f"{name}.{n}" for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


def test_only_the_owning_package_imports_each_outside_system() -> None:
    # The benchmark speaks raw gRPC and raw tritonclient on purpose: its ceilings measure them without recsvc.
    bench = ("recsvc.offline.bench.loadgen", "recsvc.offline.bench.echo", "recsvc.offline.bench.ceilings",
             "recsvc.offline.bench.e2e")
    owners = {"grpc": ("recsvc.server", "recsvc.v1", "recsvc.ranking", *bench), "faiss": ("recsvc.retrieval",),
              "tritonclient": ("recsvc.ranking", "recsvc.offline.bench.ceilings"), "redis": ("recsvc.redis_conn",)}
    offenders = []
    for name in MODULES:
        source = importlib.util.find_spec(name).origin  # type: ignore[union-attr]
        text = open(source).read()
        for lib, allowed in owners.items():
            imports = re.search(rf"^\s*(import|from)\s+{lib}\b", text, flags=re.M)
            if imports and not name.startswith(allowed):
                offenders.append(f"{name} imports {lib}")
    assert offenders == []
