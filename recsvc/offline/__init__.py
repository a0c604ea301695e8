"""The offline toolchain: training, evaluation, compression, TensorRT engines, cache-sim, the local Triton launcher.

It may import the serving runtime (recsvc/*, outside this package); the runtime never imports it, so a
serving process loads neither torch nor matplotlib nor pytriton (tests/unit/test_layout.py checks both).
"""

from __future__ import annotations

__all__: list[str] = []
