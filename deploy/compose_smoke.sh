#!/usr/bin/env bash
# The compose stack for real on a machine whose Docker engine reaches no image registry:
# 1. base images from Debian's own packages (debootstrap bookworm, then `docker import`):
#    hybridnas-base:bookworm (python3 3.11) and hybridnas-postgres:15 (Debian's postgresql, deploy/postgres-entrypoint.sh);
#    skipped when the image exists;
# 2. the Python wheels from the host's pip (its indexes and find-links) into deploy/.wheels (ignored by git);
# 3. the project image from deploy/Dockerfile on the local base, installed with --no-index from those wheels;
# 4. the CPU profile up with deploy/compose.local.yml (local images), coordinator on 127.0.0.1:$HYBRIDNAS_PORT;
# 5. a tiny search over REST from the host, its front and per candidate the Ray node/pid that ran it;
#    then `docker-compose down -v`.
# Run as root (debootstrap, dockerd). Usage: deploy/compose_smoke.sh [LOG]   (output also goes to LOG)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG=${1:-deploy/results/compose_smoke.log}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${SMOKE_WORK:-/var/tmp/hybridnas-smoke}
export COMPOSE_PROJECT_NAME=hybridnas-smoke
export HYBRIDNAS_PORT=${HYBRIDNAS_PORT:-18650}
COMPOSE=(docker-compose -f docker-compose.yml -f deploy/compose.local.yml --profile cpu)

mkdir -p "$(dirname "$LOG")" "$WORK"
exec > >(tee "$LOG") 2>&1
echo "# deploy/compose_smoke.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "# machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, no GPU"
echo "# $(docker version --format 'docker engine {{.Server.Version}}'), $(docker-compose version --short | sed 's/^/docker-compose /')"

step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

rootfs_image() {  # rootfs_image TAG PACKAGES [SETUP]: debootstrap bookworm with PACKAGES, imported as TAG
    local tag=$1 packages=$2 dir
    if docker image inspect "$tag" >/dev/null 2>&1; then
        echo "$tag exists: debootstrap skipped"
        return
    fi
    dir=$WORK/rootfs-${tag//[:\/]/-}
    rm -rf "$dir"
    debootstrap --variant=minbase --include="$packages" bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 \
        || { tail -n 20 "$dir.log"; exit 1; }
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$tag"
    rm -rf "$dir"
    echo "$tag imported ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

step "1. base images from Debian bookworm packages"
if ! docker info >/dev/null 2>&1; then
    echo "dockerd not running: starting it"
    (dockerd >/var/log/hybridnas-dockerd.log 2>&1 &)
    for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
rootfs_image hybridnas-base:bookworm python3,python3-venv,ca-certificates,passwd
rootfs_image hybridnas-postgres-rootfs:15 postgresql,ca-certificates
if ! docker image inspect hybridnas-postgres:15 >/dev/null 2>&1; then
    docker build -q -t hybridnas-postgres:15 -f deploy/postgres.Dockerfile deploy
fi

step "2. wheels from the host's pip into deploy/.wheels"
mkdir -p deploy/.wheels
echo '*' >deploy/.wheels/.gitignore
"$PYTHON" -m pip wheel -q -w deploy/.wheels -c constraints/cpu.txt '.[tune,hf]' setuptools wheel
rm -f deploy/.wheels/hybridnas-*.whl  # the image builds the project from its own source
echo "$(ls deploy/.wheels/*.whl | wc -l) wheels, $(du -sh deploy/.wheels | cut -f1)"

step "3. the project image (deploy/Dockerfile on hybridnas-base:bookworm, --no-index)"
"${COMPOSE[@]}" build coordinator

step "4. the CPU stack up"
export HYBRIDNAS_TOKEN
HYBRIDNAS_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
trap '"${COMPOSE[@]}" logs --no-color --tail=40 || true; "${COMPOSE[@]}" down -v --remove-orphans' EXIT
"${COMPOSE[@]}" up -d --scale ray-worker-cpu=2
"${COMPOSE[@]}" ps

step "5. a search over REST from the host (http://127.0.0.1:$HYBRIDNAS_PORT)"
"$PYTHON" deploy/smoke_search.py "http://127.0.0.1:$HYBRIDNAS_PORT"

step "down"
trap - EXIT
"${COMPOSE[@]}" down -v --remove-orphans
echo "smoke run passed"
