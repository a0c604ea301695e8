#!/usr/bin/env bash
# The end-to-end runs behind docs/PERFORMANCE.md ("End to end"), one after the other, each into var/bench/<name>.
# Each `recsvc bench --start` starts its own Triton and server (RECSVC_* configure them) and, with --ceilings,
# measures the echo, FAISS and Triton ceilings in the same run. The 1M-item runs need
# `python benchmarks/make_1m_stack.py var/stack1m` first. Then: python benchmarks/e2e_report.py var/bench/*
set -euo pipefail
cd "$(dirname "$0")/.."
bench=(.venv/bin/recsvc bench --start --duration "${DURATION:-8}" --warmup 2)
off=(RECSVC_L1_MAX_ENTRIES=1 RECSVC_L2_BACKEND=none RECSVC_VECTOR_CACHE_ENTRIES=1 RECSVC_WARM_USERS=0 RECSVC_MAX_BATCH=1)
m1=(RECSVC_MODEL_REPOSITORY=var/stack1m/repo RECSVC_DATA_DIR=var/stack1m/var RECSVC_INDEX_NPROBE=16)
run() { local name=$1; shift; env "$@" "${bench[@]}" --label "$name" --out "var/bench/$name" "${extra[@]}"; }
extra=(--concurrency 1,4,16,32,64 --rate 200,400,800 --ceilings); run movielens
extra=(--concurrency 4,16,64); run movielens-off "${off[@]}"
extra=(--concurrency 4,16,32,64); run movielens-2-workers RECSVC_WORKERS=2
if [ -d var/stack1m/repo ]; then
    extra=(--concurrency 1,4,16,32,64 --ceilings); run 1m "${m1[@]}"
    extra=(--concurrency 4,16,64); run 1m-off "${m1[@]}" "${off[@]}"
fi
