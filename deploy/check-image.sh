#!/usr/bin/env bash
# The image built and run for real, on a machine with no registry but PyPI and Debian's:
#
#   1. installs Docker (Debian's docker.io and docker-compose) and HAProxy where missing,
#      and starts dockerd where none runs;
#   2. builds the stand-in base image where missing (deploy/base-image.sh);
#   3. builds the image: torch from a local PEP 503 index over the wheel on this disk
#      (python -m http.server on 127.0.0.1, hence --network host), every other package
#      from PyPI through the host's CA bundle (PYPI_CA_BUNDLE);
#   4. `docker compose up` with the mounted weights (read-only root, no capabilities):
#      waits for healthy, checks the user is not root, scores a Fashion-MNIST image; sends
#      SIGTERM with requests in flight and checks each is answered and the exit code is 0;
#      then the same with GLOW_WEIGHTS=/weights/mnist and an MNIST image;
#   5. validates the GPU override file (docker-compose config; no GPU here);
#   6. runs 3 replicas behind HAProxy (deploy/haproxy.cfg) health-checked on /readyz, drives
#      load through it, SIGTERMs one replica mid-load and checks that every request was
#      answered and that the balancer stopped sending to the draining one.
#
# It removes what it started (containers, HAProxy, the local index, dockerd) on any exit,
# and keeps the images (the layer cache makes the next build a matter of seconds).
#
#   deploy/check-image.sh           (or: make check-image)
#
# Settings (environment): IMAGE (glow-service:check), BASE_IMAGE
# (glow-python-base:3.11-bookworm), FMNIST (/usr/share/datasets/fashion-mnist),
# MNIST (../shared/data/mnist), TORCH_WHEEL (the torch wheel for the local index; by default
# the one in /opt/wheels or from `pip download`; none: PyTorch's own CPU index),
# and the build arguments TORCH_INDEX_URL, PYPI_INDEX_URL, PYPI_TRUSTED_HOST (passed on when
# set). Ports on 127.0.0.1: 18080, 18100-18109, 18999.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-glow-service:check}
BASE_IMAGE=${BASE_IMAGE:-glow-python-base:3.11-bookworm}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
MNIST=${MNIST:-../shared/data/mnist}
TORCH_VERSION=$(sed -n 's/^torch==\([^ ]*\)$/\1/p' constraints.txt)
PROJECT=glowcheck            # compose project and container name prefix
COMPOSE_PORT=18080
LB_PORT=18100
LB_STATS_PORT=18109
INDEX_PORT=18999
WORK=$(mktemp -d /tmp/glow-check.XXXXXX)

SECONDS=0
log() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

dockerd_pid="" index_pid="" haproxy_pid=""
compose() { docker-compose -p "$PROJECT" -f docker-compose.yml "$@"; }
cleanup() {
    local rc=$?
    set +e
    [ -n "$haproxy_pid" ] && kill "$haproxy_pid" 2>/dev/null
    if docker info >/dev/null 2>&1; then
        compose down --timeout 40 >/dev/null 2>&1
        docker ps -aq --filter "name=^${PROJECT}-" | xargs -r docker rm -f >/dev/null
    fi
    [ -n "$index_pid" ] && kill "$index_pid" 2>/dev/null
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" && wait "$dockerd_pid" 2>/dev/null
        log "stopped the dockerd this script started"
    fi
    rm -f deploy/certs/host-ca.pem
    rm -rf "$WORK"
    log "$([ "$rc" = 0 ] && echo PASSED || echo "FAILED (exit $rc)") in ${SECONDS} s"
}
trap cleanup EXIT

for idx in "$FMNIST/t10k-images-idx3-ubyte.gz" "$MNIST/t10k-images-idx3-ubyte.gz"; do
    [ -f "$idx" ] || fail "no $idx (set FMNIST and MNIST to the datasets' folders)"
done

# ------------------------------------------------------------------------------ 1. tools
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$WORK/apt.log"
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
fi
log "engine: $(docker version -f 'server {{.Server.Version}}, client {{.Client.Version}}'), $(docker-compose version --short 2>/dev/null | head -1 | sed 's/^/docker-compose /')"

# ------------------------------------------------------------------------------ 2. base image
started=$SECONDS
deploy/base-image.sh "$BASE_IMAGE" >"$WORK/base.log" 2>&1 || { tail -30 "$WORK/base.log"; fail "the base image"; }
log "$(tail -1 "$WORK/base.log") ($((SECONDS - started)) s)"

# ------------------------------------------------------------------------------ 3. the image
# The build arguments, exported: docker-compose's build section reads the same variables.
export PYTHON_IMAGE=$BASE_IMAGE
export TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
export PYPI_INDEX_URL=${PYPI_INDEX_URL:-https://pypi.org/simple}
export PYPI_TRUSTED_HOST=${PYPI_TRUSTED_HOST:-}
export PYPI_CA_BUNDLE=""
wheel=${TORCH_WHEEL:-$(find /opt/wheels -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-cp311-*.whl" 2>/dev/null | head -1)}
if [ -z "$wheel" ] && python3 -m pip download -q --no-deps -d "$WORK/wheel" "torch==$TORCH_VERSION" 2>/dev/null; then
    wheel=$(find "$WORK/wheel" -name 'torch-*.whl' | head -1)
fi
if [ -n "$wheel" ]; then
    mkdir -p "$WORK/index/simple/torch"
    name=$(basename "$wheel")
    ln -s "$(readlink -f "$wheel")" "$WORK/index/simple/torch/$name"
    printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "${name//+/%2B}" "$name" \
        >"$WORK/index/simple/torch/index.html"
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >"$WORK/index.log" 2>&1 &
    index_pid=$!
    TORCH_INDEX_URL=http://127.0.0.1:$INDEX_PORT/simple
    log "torch from a local index over $name"
fi
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt deploy/certs/host-ca.pem
    PYPI_CA_BUNDLE=host-ca.pem
fi
build_args=()
for arg in PYTHON_IMAGE TORCH_INDEX_URL PYPI_INDEX_URL PYPI_TRUSTED_HOST PYPI_CA_BUNDLE; do
    build_args+=(--build-arg "$arg=${!arg}")
done
log "building $IMAGE"
build_start=$SECONDS
docker build -q --network host "${build_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "docker build"; }
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
log "built $IMAGE in $((SECONDS - build_start)) s: $((size / 1000000)) MB"
# the compose file's build section, with the same arguments: every layer from the cache
GLOW_IMAGE_TAG=${IMAGE#*:} GLOW_BUILD_NETWORK=host compose build >"$WORK/compose-build.log" 2>&1 \
    || { tail -30 "$WORK/compose-build.log"; fail "docker-compose build"; }
[ "$(docker image inspect -f '{{.Id}}' "$IMAGE")" = "$id" ] || fail "docker-compose build made another image"
log "docker-compose build (network: host, the same arguments): the same image, from the cache"
[ "$size" -lt 900000000 ] || fail "the image is $((size / 1000000)) MB, over 900 MB"
[ -n "$index_pid" ] && { kill "$index_pid"; index_pid=""; }
rm -f deploy/certs/host-ca.pem

user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
case "${user%%:*}" in ""|0|root) fail "the image's user is root ('$user')" ;; esac
docker run --rm --entrypoint glow-train "$IMAGE" --help >/dev/null || fail "glow-train --help in the image"
log "image user $user; glow-train runs"

# ------------------------------------------------------------------------------ 4. compose
wait_healthy() {  # container, seconds
    local status=""
    for _ in $(seq "$2"); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$1")
        [ "$status" = healthy ] && return 0
        [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || break
        sleep 1
    done
    docker logs --tail 20 "$1"
    fail "container $1 not healthy (${status:-no status})"
}

compose_run() {  # dataset, weights folder, IDX file
    local dataset=$1 weights=$2 idx=$3 started cid code uid
    started=$SECONDS
    GLOW_IMAGE_TAG=${IMAGE#*:} GLOW_HOST_PORT=127.0.0.1:$COMPOSE_PORT GLOW_WEIGHTS=/weights/$weights \
        compose up -d --no-build >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; fail "compose up"; }
    cid=$(compose ps -q glow)
    wait_healthy "$cid" 120
    uid=$(docker exec "$cid" id -u)
    [ "$uid" != 0 ] || fail "the service runs as root"
    log "compose up ($weights from the mounted ./weights): healthy in $((SECONDS - started)) s, uid $uid," \
        "root filesystem read-only: $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$cid")"
    python3 deploy/check_client.py score "http://127.0.0.1:$COMPOSE_PORT" "$idx" --dataset "$dataset" \
        || fail "scoring a $dataset image"
    # SIGTERM (docker stop) after 2 s of 12 closed-loop clients sending 64 images each (within the
    # queue's 1024): 12 requests queued or running at the signal
    python3 deploy/check_client.py drain "http://127.0.0.1:$COMPOSE_PORT" --idx "$idx" --clients 12 \
        --images 64 --delay 2 -- docker stop -t 40 "$cid" || fail "requests in flight at SIGTERM"
    code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    [ "$code" = 0 ] || { docker logs --tail 20 "$cid"; fail "exit code $code after SIGTERM"; }
    log "SIGTERM: exit code $code"
    compose down >/dev/null 2>&1
}

compose_run fashion-mnist fashion-mnist "$FMNIST/t10k-images-idx3-ubyte.gz"
compose_run mnist mnist "$MNIST/t10k-images-idx3-ubyte.gz"

# ------------------------------------------------------------------------------ 5. GPU file
docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config >"$WORK/gpu.yml" \
    || fail "docker-compose config with docker-compose.gpu.yml"
if ! grep -q 'driver: nvidia' "$WORK/gpu.yml" || ! grep -q 'GLOW_DEVICE: cuda' "$WORK/gpu.yml"; then
    fail "the GPU override reserves no NVIDIA GPU or does not set GLOW_DEVICE=cuda"
fi
log "GPU override: valid, reserves an NVIDIA GPU, GLOW_DEVICE=cuda (not run: no GPU here)"

# ------------------------------------------------------------------------------ 6. replicas
started=$SECONDS
for i in 1 2 3; do
    # host network: each replica on its own loopback port, HAProxy in front on the host
    docker run -d --name "$PROJECT-r$i" --network host --read-only --tmpfs /tmp --cap-drop ALL \
        --security-opt no-new-privileges:true -e GLOW_HOST=127.0.0.1 -e GLOW_PORT=$((LB_PORT + i)) \
        -e GLOW_THREADS=1 "$IMAGE" >/dev/null
done
for i in 1 2 3; do wait_healthy "$PROJECT-r$i" 180; done
GLOW_LB_PORT=$LB_PORT GLOW_LB_STATS_PORT=$LB_STATS_PORT GLOW_REPLICA_PORT_1=$((LB_PORT + 1)) \
    GLOW_REPLICA_PORT_2=$((LB_PORT + 2)) GLOW_REPLICA_PORT_3=$((LB_PORT + 3)) \
    haproxy -f deploy/haproxy.cfg -db >"$WORK/haproxy.log" 2>&1 &
haproxy_pid=$!
for _ in $(seq 20); do
    [ "$(curl -s "http://127.0.0.1:$LB_STATS_PORT/stats;csv" | grep -c ',UP,')" = 3 ] && break
    sleep 0.5
done
log "3 replicas healthy and UP behind HAProxy in $((SECONDS - started)) s"
python3 deploy/check_client.py replicas "http://127.0.0.1:$LB_PORT" "http://127.0.0.1:$LB_STATS_PORT/stats" \
    --replica glow-r2 --idx "$FMNIST/t10k-images-idx3-ubyte.gz" --clients 8 --images 4 --duration 20 \
    -- docker stop -t 40 "$PROJECT-r2" || fail "a replica's SIGTERM under load"
code=$(docker inspect -f '{{.State.ExitCode}}' "$PROJECT-r2")
[ "$code" = 0 ] || fail "replica 2 exit code $code after SIGTERM"
log "replica 2: exit code $code"
