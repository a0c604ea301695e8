#!/bin/sh
# Move the version that publish.sh staged (and build-engines.sh completed) into the shared repository;
# rollout.py then rolls it out. Nothing is served before that: a version directory alone is only a
# candidate, and serving.json says what serves.
#
# It follows `recsvc publish`'s own protocol, so the two can run side by side: the flock on the model
# directory serialises publishers, the number is one above every numeric directory, and the version is
# copied to .staging-N, flushed, and renamed to N, so Triton and recsvc see all of it or none of it.
set -eu
: "${MODEL:?}" "${FLAVOUR:?}" "${WORK:?}" "${REPOSITORY:?}"

log() { echo "commit: $*" >&2; }
die() { log "$*"; exit 1; }

if [ -f "$WORK/SKIP" ]; then
    log "nothing was staged; nothing to commit"
    exit 0
fi
staged=$(cat "$WORK/VERSION")
src=$WORK/repository/$MODEL
dst=$REPOSITORY/$MODEL
mkdir -p "$dst"

if [ -z "${COMMIT_LOCKED:-}" ]; then
    # The same lock recsvc publish takes: an exclusive flock on the model directory itself.
    COMMIT_LOCKED=1 exec flock "$dst" sh "$0" "$@"
fi

if [ "$FLAVOUR" = gpu ] && [ ! -f "$src/$staged/model.plan" ]; then
    die "$src/$staged has no model.plan: the engine build did not finish"
fi

if [ -f "$dst/config.pbtxt" ]; then
    case $FLAVOUR in
        cpu) pattern='^backend: *"python"' ;;
        gpu) pattern='^platform: *"tensorrt_plan"' ;;
        *) die "unknown FLAVOUR $FLAVOUR" ;;
    esac
    grep -q "$pattern" "$dst/config.pbtxt" ||
        die "$dst/config.pbtxt is not a $FLAVOUR model config; use a repository per Triton target"
else
    cp "$src/config.pbtxt" "$dst/.config.pbtxt.tmp"
    sync
    mv "$dst/.config.pbtxt.tmp" "$dst/config.pbtxt"
fi

# Under the lock nobody else is writing: a staging directory is an interrupted publish's leftover.
for leftover in "$dst"/.staging-*; do
    [ -e "$leftover" ] || continue
    log "removing leftover $leftover"
    rm -rf "$leftover"
done

# Another publisher may have taken the staged number meanwhile; numbers are never reused.
version=0
for d in "$dst"/*/; do
    n=$(basename "$d")
    case $n in '' | *[!0-9]*) continue ;; esac
    if [ "$n" -gt "$version" ]; then version=$n; fi
done
version=$((version + 1))

cp -R "$src/$staged" "$dst/.staging-$version"
sync
mv "$dst/.staging-$version" "$dst/$version"
sync
echo "$version" >"$WORK/VERSION"
log "published $MODEL version $version"
