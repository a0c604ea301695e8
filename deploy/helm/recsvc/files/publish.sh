#!/bin/sh
# Publish one model bundle (the publish Job's step in the recsvc image), then have it rolled out.
#
#   publish.sh direct   cpu target, shared volume $REPOSITORY: `recsvc publish BUNDLE` writes .staging-N,
#                       fsyncs it, renames it to N under a lock, and rolls N out through Triton (load beside
#                       the serving version, canary, switch, drain, unload); rollout.py runs it (it waits
#                       for Triton first and records the outcome).
#   publish.sh stage    `recsvc publish --no-rollout` into a scratch repository $WORK/repository that holds
#                       every version number already taken, and write the new number to $WORK/VERSION.
#                       Later steps add what must exist before the version may be rolled out (the TensorRT
#                       engine), publish it (commit-version.sh on a volume, object-store.sh upload to a
#                       bucket), and roll it out (rollout.py rollout).
#
# The bundle is $BUNDLE_DIR; when that is empty and TRAIN_IF_EMPTY=1 and nothing is published yet, one is
# trained with `recsvc train $TRAIN_ARGS`.
#
# Running again is harmless (a Job retry, or a new Job after `helm upgrade`): a bundle already published
# (its manifest.json equals a version's) is not published again. If rollout.py recorded that version's
# rollout (.chart-jobs: done, or refused), there is nothing to do (refused: the step fails again, saying so);
# if not, and it is the newest version, an earlier run published it without finishing the rollout, and
# only the rollout runs ($WORK/ROLLOUT). An older version is left alone: rolling back to it is a rollback
# request (rollback.toVersion), never a side effect of re-running a publish.
#
# The repository's state is read from $REPOSITORY/$MODEL (volume), or from the scratch copy and
# $WORK/remote that object-store.sh fetch wrote (bucket).
set -eu

mode=${1:?usage: publish.sh direct|stage}
: "${MODEL:?}" "${FLAVOUR:?}" "${WORK:?}"
BUNDLE_DIR=${BUNDLE_DIR:-}
TRAIN_IF_EMPTY=${TRAIN_IF_EMPTY:-0}
REPOSITORY=${REPOSITORY:-}
scripts=$(dirname "$0")
scratch=$WORK/repository
# Where serving.json and .chart-jobs are: the volume, or the scratch copy fetched from the bucket.
state=${REPOSITORY:+$REPOSITORY/$MODEL}
state=${state:-$scratch/$MODEL}

log() { echo "publish: $*" >&2; }
die() { log "$*"; exit 1; }

# Version numbers already taken, one per line.
taken_numbers() {
    if [ -n "$REPOSITORY" ]; then
        [ -d "$REPOSITORY/$MODEL" ] || return 0
        for d in "$REPOSITORY/$MODEL"/*/; do
            n=$(basename "$d")
            case $n in '' | *[!0-9]*) continue ;; esac
            echo "$n"
        done
    elif [ -f "$WORK/remote/versions" ]; then
        cat "$WORK/remote/versions"
    fi
}

manifest_of() {
    if [ -n "$REPOSITORY" ]; then echo "$REPOSITORY/$MODEL/$1/bundle/manifest.json"; else echo "$WORK/remote/$1.manifest.json"; fi
}

# Published versions (those with a manifest), ascending.
published_versions() {
    for n in $(taken_numbers | sort -n); do
        if [ -f "$(manifest_of "$n")" ]; then echo "$n"; fi
    done
    return 0
}

# What rollout.py recorded last for key $1 (done, refused, started), or nothing.
job_state() {
    [ -f "$state/.chart-jobs" ] || return 0
    awk -v k="$1" '$1 == k { s = $2 } END { print s }' "$state/.chart-jobs"
}

skip() {
    log "$*"
    : >"$WORK/SKIP"
    exit 0
}

# Nothing to publish, but version $1 still has to be rolled out.
finish() {
    log "$2"
    if [ "$mode" = direct ]; then
        exec python "$scripts/rollout.py" rollout "$1"
    fi
    : >"$WORK/SKIP"
    echo "$1" >"$WORK/ROLLOUT"
    exit 0
}

# The model configuration must be the one for this Triton target: a python-backend config in front of a
# TensorRT engine (or the reverse) would fail only when Triton loads the version.
check_config() {
    config=$1
    [ -f "$config" ] || return 0
    case $FLAVOUR in
        cpu) pattern='^backend: *"python"' ;;
        gpu) pattern='^platform: *"tensorrt_plan"' ;;
        *) die "unknown FLAVOUR $FLAVOUR" ;;
    esac
    grep -q "$pattern" "$config" ||
        die "$config is not a $FLAVOUR model config (no line matching $pattern); use a repository per Triton target"
}

mkdir -p "$WORK"
rm -f "$WORK/SKIP" "$WORK/VERSION" "$WORK/ROLLOUT"
# A repository set up for the other Triton target is reported even when there is nothing to publish.
check_config "$state/config.pbtxt"
newest=$(published_versions | tail -n 1)

if [ -z "$BUNDLE_DIR" ]; then
    [ "$TRAIN_IF_EMPTY" = 1 ] || skip "no bundle given; nothing to publish"
    if [ -n "$newest" ]; then
        if [ -z "$(job_state "publish-$newest")" ] && [ ! -f "$state/serving.json" ]; then
            finish "$newest" "version $newest is published but nothing was ever rolled out: rolling it out"
        fi
        skip "a version is already published; not training a bootstrap model"
    fi
    log "nothing published yet: training one (recsvc train ${TRAIN_ARGS:-})"
    # Word splitting of TRAIN_ARGS is intended: it holds the CLI arguments.
    # shellcheck disable=SC2086
    recsvc train ${TRAIN_ARGS:-} --out "$WORK/bundle"
    BUNDLE_DIR=$WORK/bundle
fi

[ -f "$BUNDLE_DIR/manifest.json" ] || die "$BUNDLE_DIR is not a bundle (no manifest.json)"
match=""
for n in $(published_versions); do
    if cmp -s "$(manifest_of "$n")" "$BUNDLE_DIR/manifest.json"; then match=$n; fi
done
if [ -n "$match" ]; then
    case $(job_state "publish-$match") in
        done) skip "$BUNDLE_DIR is already published as version $match and was rolled out; nothing to do" ;;
        refused) die "$BUNDLE_DIR is published as version $match, whose rollout was refused (serving.json lists it under refused; the rollout's log says why). Publish a fixed bundle, or roll it out again with rollback.toVersion=$match." ;;
    esac
    if [ "$match" = "$newest" ]; then
        finish "$match" "$BUNDLE_DIR is already published as version $match, the newest, which was never rolled out by this chart: rolling it out"
    fi
    skip "$BUNDLE_DIR is already published as version $match (the newest is $newest); to serve it again, request a rollback with rollback.toVersion=$match"
fi

case $mode in
    direct)
        [ -n "$REPOSITORY" ] || die "direct mode needs REPOSITORY"
        export RECSVC_MODEL_REPOSITORY="$REPOSITORY"
        exec python "$scripts/rollout.py" publish "$BUNDLE_DIR"
        ;;
    stage)
        mkdir -p "$scratch/$MODEL"
        if [ -n "$REPOSITORY" ]; then
            # recsvc publish numbers a version one above every numeric directory it finds, complete or not,
            # so empty stand-ins for the taken numbers make it pick the next free one. (With a bucket, the
            # fetch step left a stub of every version here, with the bucket's config and serving.json.)
            rm -rf "$scratch"
            mkdir -p "$scratch/$MODEL"
            for n in $(taken_numbers); do mkdir "$scratch/$MODEL/$n"; done
        fi
        # Without a config yet, recsvc writes the target's, its warm-up shaped like this bundle.
        RECSVC_MODEL_REPOSITORY=$scratch recsvc publish --no-rollout --target "$FLAVOUR" "$BUNDLE_DIR"
        python -c 'import sys; from pathlib import Path; from recsvc.repository import latest_version; print(latest_version(Path(sys.argv[1]), sys.argv[2]))' \
            "$scratch" "$MODEL" >"$WORK/VERSION"
        log "staged $MODEL version $(cat "$WORK/VERSION")"
        ;;
    *) die "unknown mode $mode" ;;
esac
