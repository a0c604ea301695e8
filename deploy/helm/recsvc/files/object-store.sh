#!/bin/sh
# The model repository in object storage, through rclone (runs in the rclone image).
#
# Layout under $REMOTE (an rclone path such as s3:bucket/recsvc):
#   repository/<model>/config.pbtxt         the model configuration
#   repository/<model>/<N>.tar              version N: the version directory as one tar object
#   repository/<model>/<N>.manifest.json    its bundle manifest (what the publish Job compares against)
#   repository/<model>/serving.json         the rollout's state (recsvc/repository/rollout.py): written by
#                                           the publish and rollback Jobs (rollout.py) as they roll out
#   repository/<model>/.chart-jobs          what those Jobs carried out (rollout.py)
#   repository/<model>/.pods/<pod>          each Triton pod's heartbeat: "<unix time> <versions it holds>"
#   bundles/<name>/                         bundles waiting to be published
#
# A version is one object, and an object appears whole or not at all, so no reader ever sees half a
# version; each pod downloads it (rclone checks size and hash), unpacks it next to its local copy and
# renames it into place. Files rather than pipes between rclone and tar: a pipe would hide a failed
# transfer from a shell without pipefail.
#
# Each pod keeps the versions it may be asked to serve: the newest $KEEP_VERSIONS, and every version
# serving.json names (serving, previous, loaded), so a rollback to the previous version never waits for a
# download. serving.json is copied every $SERVING_POLL_SECONDS, and a new one becomes visible in the pod
# (an atomic rename) only once every version it names is there: recsvc and triton-sync, which read it
# locally, never see a serving.json naming a version the copy lacks.
#
#   object-store.sh once      copy the versions, then serving.json; repeat until at least one version is there
#   object-store.sh loop      keep the copy current: versions every $POLL_SECONDS, serving.json every
#                             $SERVING_POLL_SECONDS; with $ACK_NAME (Triton pods), write the heartbeat
#                             every $ACK_SECONDS, which the Jobs wait on before they roll a version out
#   object-store.sh fetch     (Jobs) the remote state as a scratch repository $WORK/repository: config,
#                             serving.json, .chart-jobs and every version as a stub (its manifest; rollout.py
#                             downloads the version it rolls out in full); the version list and manifests
#                             in $WORK/remote; bundles/$BUNDLE in $WORK/bundle; and the rclone binary in
#                             $WORK/bin for rollout.py
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

# Version numbers in a listing of remote_files ($1), ascending.
versions_in() {
    echo "$1" | sed -n 's/^\([0-9][0-9]*\)\.tar$/\1/p' | sort -n
}

# The versions serving.json ($1) names: version, previous and loaded (refused ones are not needed).
# recsvc writes it with orjson, indented or not; splitting at {}, keeps one key per line either way.
serving_versions() {
    [ -f "$1" ] || return 0
    tr '{},' '\n\n\n' <"$1" | awk '
        /"[a-z_]+"[ \t]*:/ { match($0, /"[a-z_]+"/); key = substr($0, RSTART + 1, RLENGTH - 2); sub(/^[^:]*:/, "") }
        key == "version" || key == "previous" || key == "loaded" { gsub(/[^0-9]+/, " "); print }
    ' | tr ' ' '\n' | grep -x '[0-9][0-9]*' | sort -un || true
}

# Complete local versions in $1 (a model directory), ascending.
local_versions() {
    for m in "$1"/*/bundle/manifest.json; do
        [ -f "$m" ] || continue
        n=${m%/bundle/manifest.json}
        n=${n##*/}
        case $n in '' | *[!0-9]*) continue ;; esac
        echo "$n"
    done | sort -n
}

# What a pod keeps: the newest $KEEP_VERSIONS of the remote versions ($1) and what serving.json ($2) names.
wanted_versions() {
    {
        echo "$1" | grep . | tail -n "${KEEP_VERSIONS:-3}" || true
        serving_versions "$2"
    } | sort -un
}

# Download version $1 into model directory $2 (one atomic rename).
pull_version() {
    n=$1 dst=$2
    tmp=$dst/.sync-$n
    rm -rf "$tmp" "$tmp.tar"
    mkdir -p "$tmp"
    if ! rclone copyto "$remote_model/$n.tar" "$tmp.tar" || ! tar -xf "$tmp.tar" -C "$tmp"; then
        log "could not copy version $n; will retry"
        rm -rf "$tmp" "$tmp.tar"
        return 1
    fi
    rm -f "$tmp.tar"
    if [ ! -f "$tmp/$n/bundle/manifest.json" ]; then
        log "$n.tar does not hold a complete version $n; skipped"
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "${dst:?}/$n"
    mv "$tmp/$n" "$dst/$n"
    rm -rf "$tmp"
    log "copied $MODEL version $n"
}

# One round over the versions: the config, then every wanted version missing from $REPOSITORY, then
# remove local versions no longer wanted. Fails (removing nothing) when the bucket cannot be listed.
refresh() {
    : "${REPOSITORY:?}"
    dst=$REPOSITORY/$MODEL
    mkdir -p "$dst"
    files=$(remote_files) || return 1
    if echo "$files" | grep -qx 'config.pbtxt'; then
        rclone copyto "$remote_model/config.pbtxt" "$dst/.config.pbtxt.sync"
        if cmp -s "$dst/.config.pbtxt.sync" "$dst/config.pbtxt"; then
            rm -f "$dst/.config.pbtxt.sync"
        else
            mv -f "$dst/.config.pbtxt.sync" "$dst/config.pbtxt"
        fi
    fi
    remote=$(versions_in "$files")
    wanted=$(wanted_versions "$remote" "$dst/serving.json")
    for n in $wanted; do
        [ -d "$dst/$n" ] || pull_version "$n" "$dst" || true
    done
    # A listing without versions is more likely a wrong path than an emptied bucket: keep the copy.
    [ -n "$remote" ] || return 0
    for n in $(local_versions "$dst"); do
        if echo "$wanted" | grep -qx "$n"; then continue; fi
        log "removing old local copy of version $n"
        rm -rf "${dst:?}/$n"
    done
}

# Copy serving.json when it changed, after the versions it names. Absent before the first rollout.
sync_serving() {
    : "${REPOSITORY:?}"
    dst=$REPOSITORY/$MODEL
    mkdir -p "$dst"
    # .serving.json.sync stays: rclone then transfers only a changed serving.json.
    rclone copyto "$remote_model/serving.json" "$dst/.serving.json.sync" 2>/dev/null || return 0
    if cmp -s "$dst/.serving.json.sync" "$dst/serving.json"; then return 0; fi
    for n in $(serving_versions "$dst/.serving.json.sync"); do
        if [ ! -d "$dst/$n" ] && ! pull_version "$n" "$dst"; then
            log "serving.json names version $n, which is not copied yet; keeping the current serving.json"
            return 0
        fi
    done
    cp "$dst/.serving.json.sync" "$dst/.serving.json.new"
    mv -f "$dst/.serving.json.new" "$dst/serving.json"
    log "serving.json updated: $(tr -d ' \n' <"$dst/serving.json")"
}

has_local_version() {
    [ -n "$(local_versions "$REPOSITORY/$MODEL")" ]
}

# This pod's heartbeat: the time and the versions its copy holds.
ack() {
    ack_file=${TMPDIR:-/tmp}/recsvc-ack
    echo "$(date +%s) $(local_versions "$REPOSITORY/$MODEL" | tr '\n' ' ')" >"$ack_file"
    rclone copyto "$ack_file" "$remote_model/.pods/$ACK_NAME" || log "could not write the heartbeat"
}

case ${1:?usage: object-store.sh once|loop|fetch|upload} in
    once)
        until refresh && has_local_version; do
            log "no published version of $MODEL in $remote_model yet; publish one (docs/DEPLOY.md)"
            sleep 10
        done
        sync_serving
        ;;
    loop)
        trap 'exit 0' TERM INT
        if [ -n "${ACK_NAME:-}" ]; then
            (while true; do
                ack
                sleep "${ACK_SECONDS:-10}"
            done) &
            heartbeat=$!
            # A pod that goes away says so, so the Jobs do not wait for it.
            trap 'kill "$heartbeat" 2>/dev/null; rclone deletefile "$remote_model/.pods/$ACK_NAME" || true; exit 0' TERM INT
        fi
        next=0
        while true; do
            now=$(date +%s)
            if [ "$now" -ge "$next" ]; then
                # A failed round (network, credentials) is retried next round; the copy on disk stays usable.
                refresh || log "sync from $remote_model failed; retrying in ${POLL_SECONDS:-30}s"
                next=$((now + ${POLL_SECONDS:-30}))
            fi
            sync_serving
            sleep "${SERVING_POLL_SECONDS:-2}"
        done
        ;;
    fetch)
        : "${WORK:?}"
        scratch=$WORK/repository/$MODEL
        mkdir -p "$WORK/remote" "$WORK/bin" "$scratch"
        # rollout.py uploads serving.json from the recsvc image with this (static) rclone.
        cp "$(command -v rclone)" "$WORK/bin/rclone"
        files=$(remote_files)
        versions_in "$files" >"$WORK/remote/versions"
        for name in config.pbtxt serving.json .chart-jobs; do
            if echo "$files" | grep -qx "$name"; then rclone copyto "$remote_model/$name" "$scratch/$name"; fi
        done
        # Every version as a stub with its manifest: the numbers stay taken, and recsvc sees which exist.
        while read -r n; do
            mkdir -p "$scratch/$n"
            if echo "$files" | grep -qx "$n.manifest.json"; then
                rclone copyto "$remote_model/$n.manifest.json" "$WORK/remote/$n.manifest.json"
                mkdir -p "$scratch/$n/bundle"
                cp "$WORK/remote/$n.manifest.json" "$scratch/$n/bundle/manifest.json"
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
        while versions_in "$(remote_files)" | grep -qx "$version"; do version=$((version + 1)); done
        if [ "$version" != "$staged" ]; then mv "$src/$staged" "$src/$version"; fi
        tar -C "$src" -cf "$WORK/$version.tar" "$version"
        rclone copyto "$WORK/$version.tar" "$remote_model/$version.tar"
        rclone copyto "$src/$version/bundle/manifest.json" "$remote_model/$version.manifest.json"
        rm -f "$WORK/$version.tar"
        echo "$version" >"$WORK/VERSION"
        echo "$version" >>"$WORK/remote/versions"
        log "published $MODEL version $version to $remote_model; rollout.py rolls it out"
        ;;
    *) die "unknown command $1" ;;
esac
