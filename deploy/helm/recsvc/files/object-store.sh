#!/bin/sh
# The model repository in object storage, through rclone (runs in the rclone image).
#
# Layout under $REMOTE (an rclone path such as s3:bucket/recsvc):
#   repository/<model>/config.pbtxt         the model configuration
#   repository/<model>/<N>.tar              version N: the version directory as one tar object
#   repository/<model>/<N>.manifest.json    its bundle manifest (what the publish Job compares against)
#   bundles/<name>/                         bundles waiting to be published
#
# A version is one object, and an object appears whole or not at all, so no reader ever sees half a
# version; each pod downloads it (rclone checks size and hash), unpacks it next to its local copy and
# renames it into place. Files rather than pipes between rclone and tar: a pipe would hide a failed
# transfer from a shell without pipefail.
#
#   object-store.sh once      copy new versions into $REPOSITORY; repeat until at least one is there
#   object-store.sh loop      copy new versions every $POLL_SECONDS and keep the newest $KEEP_VERSIONS
#   object-store.sh fetch     (publish Job) list published versions and their manifests into
#                             $WORK/remote, and copy bundles/$BUNDLE to $WORK/bundle
#   object-store.sh upload    (publish Job) upload the version publish.sh staged in $WORK/repository
set -eu
: "${REMOTE:?}" "${MODEL:?}"

remote_model=$REMOTE/repository/$MODEL

log() { echo "object-store: $*" >&2; }
die() { log "$*"; exit 1; }

# File names directly under the remote model directory. rclone exits 3 when the directory does not
# exist (nothing published yet): that is an empty listing, not an error.
remote_files() {
    status=0
    rclone lsf --files-only "$remote_model/" || status=$?
    case $status in
        0 | 3) return 0 ;;
        *) return "$status" ;;
    esac
}

remote_versions() {
    remote_files | sed -n 's/^\([0-9][0-9]*\)\.tar$/\1/p' | sort -n
}

# Copy every remote version missing from $REPOSITORY into it, one atomic rename each.
pull_once() {
    : "${REPOSITORY:?}"
    dst=$REPOSITORY/$MODEL
    mkdir -p "$dst"
    files=$(remote_files)
    if echo "$files" | grep -qx 'config.pbtxt'; then
        rclone copyto "$remote_model/config.pbtxt" "$dst/.config.pbtxt.sync"
        if cmp -s "$dst/.config.pbtxt.sync" "$dst/config.pbtxt"; then
            rm -f "$dst/.config.pbtxt.sync"
        else
            mv -f "$dst/.config.pbtxt.sync" "$dst/config.pbtxt"
        fi
    fi
    for n in $(echo "$files" | sed -n 's/^\([0-9][0-9]*\)\.tar$/\1/p' | sort -n); do
        if [ -d "$dst/$n" ]; then continue; fi
        tmp=$dst/.sync-$n
        rm -rf "$tmp" "$tmp.tar"
        mkdir -p "$tmp"
        if ! rclone copyto "$remote_model/$n.tar" "$tmp.tar" || ! tar -xf "$tmp.tar" -C "$tmp"; then
            log "could not copy version $n; will retry"
            rm -rf "$tmp" "$tmp.tar"
            continue
        fi
        rm -f "$tmp.tar"
        if [ ! -f "$tmp/$n/bundle/manifest.json" ]; then
            log "$n.tar does not hold a complete version $n; skipped"
            rm -rf "$tmp"
            continue
        fi
        mv "$tmp/$n" "$dst/$n"
        rm -rf "$tmp"
        log "copied $MODEL version $n"
    done
}

# Keep the newest $KEEP_VERSIONS local versions (Triton keeps the newest two loaded).
prune() {
    keep=${KEEP_VERSIONS:-3}
    dst=$REPOSITORY/$MODEL
    local_versions=$(for d in "$dst"/*/; do basename "$d"; done | grep -x '[0-9][0-9]*' | sort -n || true)
    count=$(echo "$local_versions" | grep -c . || true)
    excess=$((count - keep))
    [ "$excess" -gt 0 ] || return 0
    for n in $(echo "$local_versions" | head -n "$excess"); do
        log "removing old local copy of version $n"
        rm -rf "${dst:?}/$n"
    done
}

has_local_version() {
    for m in "$REPOSITORY/$MODEL"/*/bundle/manifest.json; do
        if [ -f "$m" ]; then return 0; fi
    done
    return 1
}

case ${1:?usage: object-store.sh once|loop|fetch|upload} in
    once)
        until pull_once && has_local_version; do
            log "no published version of $MODEL in $remote_model yet; publish one (docs/DEPLOY.md)"
            sleep 10
        done
        ;;
    loop)
        while true; do
            sleep "${POLL_SECONDS:-30}"
            # A failed round (network, credentials) is retried next round; the copy on disk stays usable.
            pull_once || log "sync from $remote_model failed; retrying in ${POLL_SECONDS:-30}s"
            prune
        done
        ;;
    fetch)
        : "${WORK:?}"
        mkdir -p "$WORK/remote"
        remote_versions >"$WORK/remote/versions"
        files=$(remote_files)
        while read -r n; do
            if echo "$files" | grep -qx "$n.manifest.json"; then
                rclone copyto "$remote_model/$n.manifest.json" "$WORK/remote/$n.manifest.json"
            fi
        done <"$WORK/remote/versions"
        if [ -n "${BUNDLE:-}" ]; then
            rclone copy "$REMOTE/bundles/$BUNDLE" "$WORK/bundle"
            [ -f "$WORK/bundle/manifest.json" ] || die "$REMOTE/bundles/$BUNDLE is not a bundle (no manifest.json)"
        fi
        ;;
    upload)
        : "${WORK:?}"
        if [ -f "$WORK/SKIP" ]; then
            log "nothing was staged; nothing to upload"
            exit 0
        fi
        src=$WORK/repository/$MODEL
        staged=$(cat "$WORK/VERSION")
        # The configuration goes first: a pod must never hold a version without one.
        if ! remote_files | grep -qx 'config.pbtxt'; then
            rclone copyto "$src/config.pbtxt" "$remote_model/config.pbtxt"
        fi
        # Another publisher may have taken the number meanwhile; numbers are never reused.
        version=$staged
        while remote_versions | grep -qx "$version"; do version=$((version + 1)); done
        if [ "$version" != "$staged" ]; then mv "$src/$staged" "$src/$version"; fi
        tar -C "$src" -cf "$WORK/$version.tar" "$version"
        rclone copyto "$WORK/$version.tar" "$remote_model/$version.tar"
        rclone copyto "$src/$version/bundle/manifest.json" "$remote_model/$version.manifest.json"
        echo "$version" >"$WORK/VERSION"
        log "published $MODEL version $version to $remote_model"
        ;;
    *) die "unknown command $1" ;;
esac
