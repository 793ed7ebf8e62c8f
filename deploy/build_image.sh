#!/usr/bin/env bash
# Build the LocCa Serve image: deploy/build_image.sh [cpu|gpu] [--smoke]
#
#   deploy/build_image.sh                 # locca-serve:cpu
#   deploy/build_image.sh gpu             # locca-serve:gpu (needs the CUDA base image and NVIDIA's index)
#   deploy/build_image.sh cpu --smoke     # then run it on 127.0.0.1:$SMOKE_PORT and wait for /readyz
#
# With a Docker engine this is `docker build --target TARGET -t IMAGE .` and nothing more. Without one
# (this project's machines: the docker client, no engine, no registry) it builds with podman, as
# ../shared/notes/containers.md describes, doing each preparation step only once:
#   1. a containers.conf for podman (runc; ulimits that the sandbox allows) unless CONTAINERS_CONF is set;
#   2. the base: debootstrap Debian 12 -> localhost/debian:bookworm-minbase -> a python:3.11-slim stand-in
#      (deploy/base/python.Dockerfile), skipped when the image exists or PYTHON_BASE names another;
#   3. the build, with this machine's CA bundle for pip and the CPU torch wheel taken from a wheel directory
#      (LOCCA_WHEELS, default /opt/wheels) instead of the PyTorch index, which cannot be reached here.
#
# Environment: IMAGE (default locca-serve:TARGET), ENGINE (docker|podman; default: docker if its engine
# answers), PYTHON_BASE, LOCCA_WHEELS, SMOKE_PORT (18000), BUILD_ARGS (more `podman/docker build` flags).
set -euo pipefail
cd "$(dirname "$0")/.."

target=cpu smoke=0
for arg in "$@"; do
  case "$arg" in
    cpu|gpu) target=$arg ;;
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "usage: $0 [cpu|gpu] [--smoke]" >&2; exit 2 ;;
  esac
done
image=${IMAGE:-locca-serve:$target}
smoke_port=${SMOKE_PORT:-18000}
read -r -a extra <<< "${BUILD_ARGS:-}"
say() { printf '\n== %s\n' "$*" >&2; }

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
command -v "$ENGINE" >/dev/null || { echo "$ENGINE not found (apt-get install podman buildah runc debootstrap)" >&2; exit 1; }

args=(--target "$target" -t "$image")
if [ "$ENGINE" = podman ]; then
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    # crun fails here ("cgroups in hybrid mode not supported") and the default ulimits cannot be set.
    export CONTAINERS_CONF=$PWD/build/containers.conf
    mkdir -p build
    printf '[containers]\ndefault_ulimits=["nofile=1024:1024","nproc=1024:1024"]\n[engine]\nruntime="runc"\n' \
      > "$CONTAINERS_CONF"
  fi
  if [ -z "${PYTHON_BASE:-}" ]; then
    PYTHON_BASE=localhost/python:3.11-slim-bookworm
    if ! podman image exists "$PYTHON_BASE"; then
      if ! podman image exists localhost/debian:bookworm-minbase; then
        say "making localhost/debian:bookworm-minbase with debootstrap (once)"
        rootfs=build/rootfs
        rm -rf "$rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >&2
        tar -C "$rootfs" -c . | podman import - localhost/debian:bookworm-minbase
        rm -rf "$rootfs"
      fi
      say "making the $PYTHON_BASE stand-in (once)"
      podman build --network host -f deploy/base/python.Dockerfile -t "$PYTHON_BASE" deploy/base
    fi
  fi
  # --format docker keeps HEALTHCHECK (the OCI format has no such field); the build's RUN steps use the
  # host's network, which needs no bridge set up.
  args+=(--format docker --network host --build-arg "PYTHON_BASE=$PYTHON_BASE")
  ca=/etc/ssl/certs/ca-certificates.crt
  [ -f "$ca" ] && args+=(-v "$ca:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt)
  wheels=${LOCCA_WHEELS:-/opt/wheels}
  if [ -d "$wheels" ] && [ "$target" = cpu ]; then
    args+=(-v "$(realpath "$wheels"):/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=)
  fi
elif [ -n "${PYTHON_BASE:-}" ]; then
  args+=(--build-arg "PYTHON_BASE=$PYTHON_BASE")
fi

say "$ENGINE build ${args[*]} ${extra[*]:-} ."
start=$(date +%s)
"$ENGINE" build "${args[@]}" "${extra[@]}" .
say "built $image in $(( $(date +%s) - start )) s; size: $("$ENGINE" image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

if [ "$smoke" = 1 ]; then
  name=locca-smoke-$$
  # --no-healthcheck: this loop checks /readyz itself (and podman's timers need systemd, absent here).
  say "smoke test: $ENGINE run -p 127.0.0.1:$smoke_port:8000 --read-only --tmpfs /tmp $image"
  t0=$(date +%s)
  "$ENGINE" run -d --name "$name" --no-healthcheck -p "127.0.0.1:$smoke_port:8000" --read-only --tmpfs /tmp \
    "$image" >/dev/null
  trap '"$ENGINE" stop -t 30 "$name" >/dev/null 2>&1; "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true' EXIT
  for _ in $(seq 180); do
    if curl -fsS "http://127.0.0.1:$smoke_port/readyz" >/dev/null 2>&1; then
      say "ready $(( $(date +%s) - t0 )) s after the container started"
      curl -fsS "http://127.0.0.1:$smoke_port/readyz"; echo
      curl -fsS "http://127.0.0.1:$smoke_port/v1/models"; echo
      exit 0
    fi
    [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$name")" = true ] || break
    sleep 1
  done
  "$ENGINE" logs "$name" 2>&1 | tail -30 >&2
  echo "not ready: the container exited or 180 s passed" >&2
  exit 1
fi
