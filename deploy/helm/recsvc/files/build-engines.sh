#!/bin/bash
# Build the TensorRT engine (model.plan) of published versions from their model.onnx, with trtexec from
# the TensorRT image of the NGC release Triton comes from (an engine runs only on the TensorRT version
# and the GPU model it was built with, so this runs on the GPU that will serve it).
#
# Versions considered: numeric directories under $REPOSITORY/$MODEL with model.onnx and
# bundle/manifest.json but no model.plan built by this $BUILDER; only the newest $LATEST of them when LATEST is set (Triton
# loads the newest two). The optimisation profile fixes L and C to the bundle's history_len and
# num_candidates (the service always pads to them) and lets the batch range from 1 to MAX_BATCH, which
# must match max_batch_size in ranker_gpu.pbtxt.
#
# The engine is written to a temporary name and renamed, so a reader never sees half a plan, and two
# pods building the same version at once just replace one valid engine with another.
set -euo pipefail
: "${REPOSITORY:?}" "${MODEL:?}"
OPT_BATCH=${OPT_BATCH:-16}
MAX_BATCH=${MAX_BATCH:-64}
FP16=${FP16:-0}
LATEST=${LATEST:-}
# The engine builder's image (set by the chart); engines from another builder are rebuilt.
BUILDER=${BUILDER:-unknown}
read -r -a extra <<<"${TRTEXEC_EXTRA_ARGS:-}"

trtexec=$(command -v trtexec || true)
if [ -z "$trtexec" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then
    trtexec=/usr/src/tensorrt/bin/trtexec
fi
[ -n "$trtexec" ] || { echo "build-engines: trtexec not found in this image" >&2; exit 1; }

model_dir=$REPOSITORY/$MODEL
[ -d "$model_dir" ] || { echo "build-engines: no $model_dir yet; nothing to build"; exit 0; }

versions=()
for dir in "$model_dir"/*/; do
    n=$(basename "$dir")
    [[ $n =~ ^[0-9]+$ ]] || continue
    if [ ! -f "$dir/model.onnx" ] || [ ! -f "$dir/bundle/manifest.json" ]; then continue; fi
    versions+=("$n")
done
mapfile -t versions < <(printf '%s\n' "${versions[@]}" | sort -n | sed '/^$/d')
if [ -n "$LATEST" ] && [ "${#versions[@]}" -gt "$LATEST" ]; then
    versions=("${versions[@]: -$LATEST}")
fi

for n in "${versions[@]}"; do
    dir=$model_dir/$n
    # model.plan.builder names the image that built the engine: after a Triton/TensorRT upgrade the
    # engines of the versions Triton will load are rebuilt instead of failing to deserialise.
    if [ -f "$dir/model.plan" ] && [ "$(cat "$dir/model.plan.builder" 2>/dev/null || true)" = "$BUILDER" ]; then
        echo "build-engines: $MODEL version $n already has an engine from $BUILDER"
        continue
    fi
    read -r L C < <(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["history_len"], m["num_candidates"])' \
        "$dir/bundle/manifest.json")
    tmp=$dir/.model.plan.${HOSTNAME:-build}.$$
    precision=()
    [ "$FP16" = 1 ] && precision=(--fp16)
    echo "build-engines: $MODEL version $n (L=$L, C=$C, batch 1..$MAX_BATCH)"
    "$trtexec" --onnx="$dir/model.onnx" --saveEngine="$tmp" --skipInference \
        --minShapes="HISTORY:1x$L,CANDIDATES:1x$C" \
        --optShapes="HISTORY:${OPT_BATCH}x$L,CANDIDATES:${OPT_BATCH}x$C" \
        --maxShapes="HISTORY:${MAX_BATCH}x$L,CANDIDATES:${MAX_BATCH}x$C" \
        "${precision[@]}" "${extra[@]}"
    sync "$tmp"
    echo "$BUILDER" >"$tmp.builder"
    mv -f "$tmp.builder" "$dir/model.plan.builder"
    mv -f "$tmp" "$dir/model.plan"
done
