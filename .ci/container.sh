# Container engine, base image, wheelhouse and image build for the container tests (issue 12). Sourced by .ci/run.
#
# No image registry is reachable from CI, so everything comes from this machine:
#   - the engine: Debian's docker.io, started on a socket and data root of its own under $CAPSA_CI_DIR (reused
#     between runs), with no bridge and no iptables changes; builds and containers use --network host;
#   - the base image: Debian bookworm (debootstrap --variant=minbase, python3 + python3-venv) imported and tagged as
#     the Dockerfile's default PYTHON_IMAGE, so the Dockerfile itself is built unmodified;
#   - the Python packages: `pip download` into a wheelhouse, laid out as a PEP 503 simple index and served by
#     `python -m http.server` on 127.0.0.1; the Dockerfile's PIP_INDEX_URL / TORCH_INDEX_URL build arguments
#     point at it (the air-gapped build the README documents).
# What this starts (dockerd, the index server) is stopped by its pid in capsa_container_cleanup.

CAPSA_CI_DIR="${CAPSA_CI_DIR:-/opt/capsa-ci}"
CAPSA_DOCKER_SOCK="$CAPSA_CI_DIR/run/docker.sock"
CAPSA_BASE_IMAGE="python:3.11-slim-bookworm"   # the Dockerfile's default PYTHON_IMAGE
CAPSA_BASE_LABEL="capsa.ci.base=debootstrap-bookworm-minbase-1"
CAPSA_IMAGE="${CAPSA_IMAGE:-capsa-serve:ci}"
CAPSA_INDEX_PORT="${CAPSA_INDEX_PORT:-18741}"  # fixed, so the build args (and the layer cache) stay the same
# The engine's own client (Debian's docker.io, /usr/bin/docker) builds with the engine's BuildKit; a newer client
# elsewhere on PATH would need the buildx plugin for that.
CAPSA_DOCKER_CLI="${CAPSA_DOCKER_CLI:-$(test -x /usr/bin/docker && echo /usr/bin/docker || command -v docker || true)}"
_capsa_started_dockerd=""
_capsa_index_pid=""

_capsa_sudo() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
_capsa_log() { echo "[container $(date +%H:%M:%S)] $*"; }
docker() { "$CAPSA_DOCKER_CLI" "$@"; }

capsa_engine_start() {
    if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ]; then
        _capsa_log "installing docker.io (Debian)"
        _capsa_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        _capsa_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io </dev/null >/dev/null
        CAPSA_DOCKER_CLI=/usr/bin/docker
    fi
    export CAPSA_DOCKER_CLI
    export DOCKER_HOST="unix://$CAPSA_DOCKER_SOCK"
    if docker version >/dev/null 2>&1; then
        _capsa_log "reusing the engine already answering on $CAPSA_DOCKER_SOCK"
    else
        _capsa_sudo mkdir -p "$CAPSA_CI_DIR/docker" "$CAPSA_CI_DIR/run"
        # --bridge=none --iptables=false: the engine touches no network configuration of the host.
        _capsa_sudo dockerd --host "$DOCKER_HOST" --data-root "$CAPSA_CI_DIR/docker" \
            --exec-root "$CAPSA_CI_DIR/run/exec" --pidfile "$CAPSA_CI_DIR/run/dockerd.pid" \
            --bridge=none --iptables=false --ip6tables=false --storage-driver=overlay2 \
            >"$CAPSA_CI_DIR/run/dockerd.log" 2>&1 </dev/null &
        local launcher=$!   # a subshell (or sudo) around dockerd: the daemon's own pid comes from its pidfile
        local deadline=$((SECONDS + 60))
        until docker version >/dev/null 2>&1; do
            if ! kill -0 "$launcher" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
                echo "dockerd did not start; its log:" >&2; tail -n 30 "$CAPSA_CI_DIR/run/dockerd.log" >&2
                return 1
            fi
            sleep 0.5
        done
        _capsa_started_dockerd="$(cat "$CAPSA_CI_DIR/run/dockerd.pid")"
        _capsa_log "dockerd started (pid $_capsa_started_dockerd, data root $CAPSA_CI_DIR/docker)"
    fi
    export CAPSA_DOCKER_HOST="$DOCKER_HOST"
}

capsa_base_image() {
    if docker image inspect --format '{{json .Config.Labels}}' "$CAPSA_BASE_IMAGE" 2>/dev/null \
            | grep -q "\"${CAPSA_BASE_LABEL%%=*}\":\"${CAPSA_BASE_LABEL#*=}\""; then
        _capsa_log "base image $CAPSA_BASE_IMAGE: cached"
        return 0
    fi
    local tarball="$CAPSA_CI_DIR/base/bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || _capsa_sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends debootstrap </dev/null >/dev/null
        local rootfs="$CAPSA_CI_DIR/base/rootfs"
        _capsa_sudo rm -rf "$rootfs"
        _capsa_log "debootstrap bookworm (minbase + python3 python3-venv)"
        # The Debian mirror this machine's apt uses (CAPSA_DEBIAN_MIRROR overrides it).
        local mirror="${CAPSA_DEBIAN_MIRROR:-}"
        [ -n "$mirror" ] || mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)"
        [ -n "$mirror" ] || mirror="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' \
            /etc/apt/sources.list 2>/dev/null || true)"
        [ -n "$mirror" ] || { echo "no Debian mirror found in apt's sources; set CAPSA_DEBIAN_MIRROR" >&2; return 1; }
        if ! _capsa_sudo debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$rootfs" "$mirror" >"$CAPSA_CI_DIR/base/debootstrap.log" 2>&1; then
            echo "debootstrap failed:" >&2; tail -n 30 "$CAPSA_CI_DIR/base/debootstrap.log" >&2; return 1
        fi
        # Like the official python image: `python` on PATH, no apt caches or lists, no docs.
        _capsa_sudo ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
        _capsa_sudo rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
            "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
        _capsa_sudo tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        _capsa_sudo mv "$tarball.tmp" "$tarball"
        _capsa_sudo rm -rf "$rootfs"
    fi
    _capsa_log "importing $tarball as $CAPSA_BASE_IMAGE"
    docker import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change "LABEL $CAPSA_BASE_LABEL" \
        --change 'CMD ["python3"]' \
        "$tarball" "$CAPSA_BASE_IMAGE" >/dev/null
}

capsa_wheelhouse() {
    # Everything the image installs: torch (the CPU wheel on this machine's disk), the project's dependencies and
    # its build backend, as pip resolves them here (same CPython minor version and platform as the image).
    local wheels="$CAPSA_CI_DIR/wheelhouse/wheels" simple="$CAPSA_CI_DIR/wheelhouse/simple"
    mkdir -p "$wheels"
    _capsa_log "pip download into $wheels"
    if ! python -m pip download --dest "$wheels" "torch==2.13.0" "setuptools>=69" wheel . \
            >"$CAPSA_CI_DIR/run/pip-download.log" 2>&1 </dev/null; then
        echo "pip download failed:" >&2; tail -n 40 "$CAPSA_CI_DIR/run/pip-download.log" >&2; return 1
    fi
    # A PEP 503 simple index: simple/<normalized name>/<wheel>; http.server's directory listings are its pages.
    rm -rf "$simple"
    local whl name
    for whl in "$wheels"/*.whl; do
        name="$(basename "$whl")"; name="${name%%-*}"
        name="$(echo "$name" | tr 'A-Z_.' 'a-z--')"
        mkdir -p "$simple/$name"
        ln -f "$whl" "$simple/$name/" 2>/dev/null || cp "$whl" "$simple/$name/"
    done
    python -m http.server --bind 127.0.0.1 --directory "$CAPSA_CI_DIR/wheelhouse" "$CAPSA_INDEX_PORT" \
        >"$CAPSA_CI_DIR/run/index.log" 2>&1 </dev/null &
    _capsa_index_pid=$!
    CAPSA_INDEX_URL="http://127.0.0.1:$CAPSA_INDEX_PORT/simple/"
    local deadline=$((SECONDS + 30))
    until python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + 'torch/', timeout=2)" \
            "$CAPSA_INDEX_URL" 2>/dev/null; do
        if ! kill -0 "$_capsa_index_pid" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
            echo "the package index did not start:" >&2; cat "$CAPSA_CI_DIR/run/index.log" >&2; return 1
        fi
        sleep 0.2
    done
    _capsa_log "package index on $CAPSA_INDEX_URL ($(ls "$simple" | wc -l) projects)"
}

capsa_build_image() {
    _capsa_log "docker build -t $CAPSA_IMAGE (unmodified Dockerfile; packages from $CAPSA_INDEX_URL)"
    local start=$SECONDS
    DOCKER_BUILDKIT=1 docker build --network host --progress plain \
        --build-arg "PIP_INDEX_URL=$CAPSA_INDEX_URL" --build-arg "TORCH_INDEX_URL=$CAPSA_INDEX_URL" \
        -t "$CAPSA_IMAGE" . || { echo "docker build failed" >&2; return 1; }
    local size
    size="$(docker image inspect --format '{{.Size}}' "$CAPSA_IMAGE")"
    _capsa_log "image $CAPSA_IMAGE built in $((SECONDS - start)) s; size $size bytes ($((size / 1000000)) MB)"
    export CAPSA_IMAGE
}

capsa_container_cleanup() {
    if [ -n "$_capsa_index_pid" ]; then kill "$_capsa_index_pid" 2>/dev/null || true; fi
    if [ -n "$_capsa_started_dockerd" ]; then
        _capsa_log "stopping dockerd (pid $_capsa_started_dockerd)"
        _capsa_sudo kill "$_capsa_started_dockerd" 2>/dev/null || true
        local deadline=$((SECONDS + 60))
        while kill -0 "$_capsa_started_dockerd" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
        if kill -0 "$_capsa_started_dockerd" 2>/dev/null; then
            echo "dockerd (pid $_capsa_started_dockerd) did not stop within 60 s" >&2
        fi
    fi
}
