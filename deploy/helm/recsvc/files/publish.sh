#!/bin/sh
# Publish one model bundle with `recsvc publish` (the publish Job's step in the recsvc image).
#
#   publish.sh direct   publish straight into the shared repository $REPOSITORY (pvc, cpu target):
#                       recsvc publish writes .staging-N, fsyncs it and renames it to N under a lock.
#   publish.sh stage    publish into a scratch repository $WORK/repository that mirrors the version numbers
#                       already taken, and write the new number to $WORK/VERSION. A later step adds what
#                       must exist before the version appears (the TensorRT engine) and then commits it
#                       (commit-version.sh on a volume, object-store.sh upload to a bucket).
#
# The bundle is $BUNDLE_DIR; when that is empty and TRAIN_IF_EMPTY=1 and nothing is published yet, one is
# trained with `recsvc train $TRAIN_ARGS`. Publishing is idempotent: a bundle whose manifest.json equals the
# newest version's is not published again, so re-running the Job (helm upgrade, a retry) is harmless,
# while an older bundle published again becomes the newest version (a model roll-back).
#
# What is already published is read from $REPOSITORY/$MODEL/N/bundle/manifest.json (volume), or from
# $WORK/remote/versions and $WORK/remote/N.manifest.json that object-store.sh fetch wrote (bucket).
set -eu

mode=${1:?usage: publish.sh direct|stage}
: "${MODEL:?}" "${FLAVOUR:?}" "${WORK:?}"
BUNDLE_DIR=${BUNDLE_DIR:-}
TRAIN_IF_EMPTY=${TRAIN_IF_EMPTY:-0}
REPOSITORY=${REPOSITORY:-}

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

# Manifests of the published versions, one path per line, oldest first.
published_manifests() {
    if [ -n "$REPOSITORY" ]; then
        for n in $(taken_numbers | sort -n); do
            m=$REPOSITORY/$MODEL/$n/bundle/manifest.json
            if [ -f "$m" ]; then echo "$m"; fi
        done
    else
        for n in $(taken_numbers | sort -n); do
            m=$WORK/remote/$n.manifest.json
            if [ -f "$m" ]; then echo "$m"; fi
        done
    fi
    return 0
}

skip() {
    log "$*"
    : >"$WORK/SKIP"
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
rm -f "$WORK/SKIP" "$WORK/VERSION"
# A repository set up for the other Triton target is reported even when there is nothing to publish.
if [ -n "$REPOSITORY" ]; then check_config "$REPOSITORY/$MODEL/config.pbtxt"; fi

if [ -z "$BUNDLE_DIR" ]; then
    [ "$TRAIN_IF_EMPTY" = 1 ] || skip "no bundle given; nothing to publish"
    [ -z "$(published_manifests)" ] || skip "a version is already published; not training a bootstrap model"
    log "nothing published yet: training one (recsvc train ${TRAIN_ARGS:-})"
    # Word splitting of TRAIN_ARGS is intended: it holds the CLI arguments.
    # shellcheck disable=SC2086
    recsvc train ${TRAIN_ARGS:-} --out "$WORK/bundle"
    BUNDLE_DIR=$WORK/bundle
fi

[ -f "$BUNDLE_DIR/manifest.json" ] || die "$BUNDLE_DIR is not a bundle (no manifest.json)"
# Only the newest version counts: publishing an older bundle again is how a model is rolled back (it
# becomes the newest version, which every pod switches to).
newest=$(published_manifests | tail -n 1)
if [ -n "$newest" ] && cmp -s "$newest" "$BUNDLE_DIR/manifest.json"; then
    skip "$BUNDLE_DIR is already the newest published version ($newest); nothing to do"
fi

case $mode in
    direct)
        [ -n "$REPOSITORY" ] || die "direct mode needs REPOSITORY"
        RECSVC_MODEL_REPOSITORY=$REPOSITORY recsvc publish "$BUNDLE_DIR"
        ;;
    stage)
        scratch=$WORK/repository
        rm -rf "$scratch"
        mkdir -p "$scratch/$MODEL"
        # recsvc publish numbers a version one above every numeric directory it finds, complete or not,
        # so empty stand-ins for the taken numbers make it pick the next free one.
        for n in $(taken_numbers); do mkdir "$scratch/$MODEL/$n"; done
        python -c 'import sys; from recsvc.repository import config_template; sys.stdout.write(config_template(sys.argv[1]))' \
            "$FLAVOUR" >"$scratch/$MODEL/config.pbtxt"
        RECSVC_MODEL_REPOSITORY=$scratch recsvc publish "$BUNDLE_DIR"
        python -c 'import sys; from pathlib import Path; from recsvc.repository import latest_version; print(latest_version(Path(sys.argv[1]), sys.argv[2]))' \
            "$scratch" "$MODEL" >"$WORK/VERSION"
        log "staged $MODEL version $(cat "$WORK/VERSION")"
        ;;
    *) die "unknown mode $mode" ;;
esac
