#!/usr/bin/env bash
# Regenerate recsvc/v1/*_pb2*.py from protos/. The generated code is committed so that installing
# recsvc needs no protoc; tests/unit/test_protos.py fails when it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
python -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    protos/recsvc/v1/recommender.proto
touch "$out/recsvc/v1/__init__.py"
