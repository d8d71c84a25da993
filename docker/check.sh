#!/usr/bin/env bash
# Build docker/Dockerfile and prove the image and the compose stack work, with whichever engine is here.
#
#   docker/check.sh            # image, then stack
#   docker/check.sh image      # build; nst --help; what the image carries; the toy pipeline inside vs. outside
#   docker/check.sh stack      # compose up; health checks; a deployment run submitted from outside; down -v
#
# Engine: docker (with a running daemon) or podman, whichever is present (NST_ENGINE overrides). Compose:
# `docker compose`, else podman-compose (installed into .venv-tools/ when missing). Base image: BASE_IMAGE
# (default python:3.11-slim-bookworm); where it cannot be pulled (no registry reachable) the base is built
# from Debian packages by docker/local-base.sh, once. With podman the host's CA bundle (/etc/ssl/certs) is
# mounted into the build only, so pip reaches the registry behind a TLS-intercepting proxy; nothing of the
# host is baked into the image. Needs the project's .venv (make install) for the run outside the container
# and for `prefect deploy`. Exits non-zero at the first check that fails, naming it; leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
what=${1:-all}
case $what in all|image|stack) ;; *) echo "usage: docker/check.sh [all|image|stack]" >&2; exit 2 ;; esac

say()  { printf '\n== %s\n' "$*"; }
fail() { echo "check.sh: FAILED: $*" >&2; keep=1; exit 1; }
secs() { echo $(( $(date +%s) - $1 )); }

engine=${NST_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else fail "no container engine: neither docker (with a running daemon) nor podman is on PATH"; fi
fi
image=${NST_IMAGE:-noisy-student:0.2.0}
s3image=${NST_S3_IMAGE:-noisy-student-s3:0.2.0}
base=${BASE_IMAGE:-python:3.11-slim-bookworm}
[ -x .venv/bin/nst ] || fail ".venv/bin/nst missing: run 'make install' first"
work=$(mktemp -d /var/tmp/nst-check.XXXXXX)
keep=0
cleanup() { if [ "$keep" = 1 ]; then echo "check.sh: logs and outputs kept in $work" >&2; else rm -rf "$work"; fi; }
trap cleanup EXIT

build_flags=()
if [ "$engine" = podman ]; then
  # docker format: podman's default OCI format drops SHELL (pipefail) and HEALTHCHECK.
  build_flags+=(--format docker)
  [ -d /etc/ssl/certs ] && build_flags+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
fi

build_image() {
  say "base image"
  if ! "$engine" image inspect "$base" >/dev/null 2>&1 && ! timeout 120 "$engine" pull -q "$base" >/dev/null 2>&1; then
    local localbase=localhost/nst-base:bookworm
    echo "$base cannot be pulled here: using $localbase, built from Debian packages (docker/local-base.sh)"
    if ! "$engine" image inspect "$localbase" >/dev/null 2>&1; then
      local t0; t0=$(date +%s)
      docker/local-base.sh "$engine" "$localbase" >/dev/null
      echo "built $localbase in $(secs "$t0") s"
    fi
    base=$localbase
  fi
  echo "base: $base"

  say "build context (what .dockerignore lets through)"
  printf 'FROM %s\nCOPY . /context\n' "$base" > "$work/Context.Dockerfile"
  "$engine" build -q "${build_flags[@]}" -f "$work/Context.Dockerfile" -t localhost/nst-context:check . >/dev/null
  "$engine" run --rm localhost/nst-context:check sh -c 'du -sh /context | cut -f1; cd /context && ls -A | tr "\n" " "; echo'
  "$engine" run --rm localhost/nst-context:check sh -c \
    'cd /context && ! ls -d .git .venv outputs data .env .dvc/cache 2>/dev/null | grep .' \
    || fail "the build context holds one of .git .venv outputs data .env .dvc/cache (see .dockerignore)"
  "$engine" rmi -f localhost/nst-context:check >/dev/null

  say "build $image and $s3image ($engine; cached layers are reused: a first build is the figure to quote)"
  build_one "$image"
  build_one "$s3image" --target s3-server
}

# build_one TAG [BUILD ARGS...]: one docker/Dockerfile build, its log kept under $work, its time and size printed.
build_one() {
  local tag=$1 t0; shift
  local log="$work/build-${tag//[:\/]/_}.log"
  t0=$(date +%s)
  "$engine" build "${build_flags[@]}" -f docker/Dockerfile --build-arg BASE_IMAGE="$base" "$@" -t "$tag" . \
    > "$log" 2>&1 || { tail -20 "$log" >&2; fail "build of $tag"; }
  "$engine" image inspect --format '{{.Size}}' "$tag" \
    | awk -v i="$tag" -v s="$(secs "$t0")" '{printf "%s: built in %d s, %.2f GB (%.0f bytes)\n", i, s, $1/1e9, $1}'
}

check_image() {
  say "what the image carries"
  "$engine" run --rm "$image" nst --help >/dev/null || fail "nst --help in the image"
  echo "nst --help: ok"
  local uid; uid=$("$engine" run --rm "$image" id -u)
  [ "$uid" != 0 ] || fail "the image runs as root"
  echo "user: uid $uid"
  local tools; tools=$("$engine" run --rm "$image" sh -c 'for t in gcc cc g++ make debootstrap apt-get; do command -v $t; done; true')
  # apt-get is Debian's and stays (the base's package manager); compilers and make must not be there.
  if printf '%s\n' "$tools" | grep -v -x /usr/bin/apt-get | grep -q .; then fail "build tools left in the image: $tools"; fi
  echo "build tools: none (no gcc, cc, g++, make, debootstrap)"
  local env_names; env_names=$("$engine" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | cut -d= -f1)
  if printf '%s\n' "$env_names" | grep -E -i 'secret|token|password|access_key|credential'; then
    fail "the image's environment names a credential"; fi
  "$engine" run --rm "$image" sh -c '! ls -A /app /home/nst | grep -x -E "\.git|\.env|\.aws|\.netrc|.*\.pem|.*\.key"' \
    || fail "credential-like files in /app or /home/nst"
  echo "credentials: none in the image's environment, /app or /home/nst"

  say "the toy pipeline (nst run --no-prefect, tracking to a SQLite file) outside, then inside the container"
  mkdir -p "$work/host" "$work/container"
  chmod 777 "$work/container"   # the image's user (uid 1000) writes there, with any uid mapping
  cp params.yaml "$work/host/"
  local t0; t0=$(date +%s)
  (cd "$work/host" && "$repo/.venv/bin/nst" run --no-prefect > run.log 2>&1) || { tail "$work/host/run.log" >&2; fail "toy run outside"; }
  echo "outside: $(secs "$t0") s"
  t0=$(date +%s)
  "$engine" run --rm --network none -v "$work/container:/work" -w /work "$image" \
    sh -c 'cp /app/params.yaml . && nst run --no-prefect > run.log 2>&1' \
    || { tail "$work/container/run.log" >&2; fail "toy run in the container"; }
  echo "inside (--network none): $(secs "$t0") s"
  for side in host container; do
    sed -n '/^generation  role/,/^$/p' "$work/$side/run.log" > "$work/$side.table"
    [ -s "$work/$side.table" ] || fail "no generation table in the $side run's output"
    (cd "$work/$side/outputs" && sha256sum g*/model/model.safetensors) > "$work/$side.sha"
    ! grep -E 'ERROR|Traceback' "$work/$side/run.log" || fail "ERROR or traceback in the $side run"
  done
  cat "$work/container.table"
  cat "$work/container.sha"
  diff "$work/host.table" "$work/container.table" || fail "the generation table differs inside the container"
  diff "$work/host.sha" "$work/container.sha" || fail "model bytes differ inside the container"
  echo "same table and same model.safetensors sha256 inside and outside the container"
}

# --- the compose stack --------------------------------------------------------------------------------
free_port() { "$repo/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

compose_cmd() {
  if [ "$engine" = docker ]; then echo "docker compose"; return; fi
  if ! command -v podman-compose >/dev/null && [ ! -x .venv-tools/bin/podman-compose ]; then
    { python3 -m venv .venv-tools && .venv-tools/bin/pip install -q "podman-compose>=1.2"; } > "$work/pip.log" 2>&1 \
      || { tail "$work/pip.log" >&2; fail "installing podman-compose into .venv-tools"; }
  fi
  command -v podman-compose || echo "$repo/.venv-tools/bin/podman-compose"
}

check_stack() {
  for i in "$image" "$s3image"; do
    "$engine" image inspect "$i" >/dev/null 2>&1 || fail "$i not built: run docker/check.sh image first"
  done
  local compose; compose=$(compose_cmd)
  export NST_IMAGE=$image NST_S3_IMAGE=$s3image PREFECT_PORT=${PREFECT_PORT:-$(free_port)} MLFLOW_PORT=${MLFLOW_PORT:-$(free_port)} \
    NST_S3_PORT=${NST_S3_PORT:-$(free_port)}
  export PREFECT_UI_API_URL=http://127.0.0.1:$PREFECT_PORT/api
  local c=($compose -f docker/compose.yaml --profile cpu)
  stack_down() { "${c[@]}" down -v >/dev/null 2>&1 || true; }
  trap 'stack_down; cleanup' EXIT
  say "compose up (Prefect :$PREFECT_PORT, MLflow :$MLFLOW_PORT, S3 :$NST_S3_PORT)"
  local t0; t0=$(date +%s)
  local up=(up -d)
  # podman < 4.6 cannot wait for `condition: service_healthy`, and podman-compose's --requires on the one-shot
  # s3-init then refuses to start what depends on it: start every service at once (s3-init and the worker
  # retry until their servers answer; the wait below checks each service's own health check).
  if [ "$engine" = podman ] && ! printf '4.6\n%s\n' "$(podman version --format '{{.Client.Version}}')" | sort -C -V; then
    up+=(--no-deps)
  fi
  "${c[@]}" "${up[@]}" > "$work/up.log" 2>&1 || { tail -20 "$work/up.log" >&2; fail "compose up"; }
  "$repo/.venv/bin/python" docker/stack_check.py wait --engine "$engine" --timeout 300 \
    || { "${c[@]}" logs > "$work/logs.txt" 2>&1; tail -40 "$work/logs.txt" >&2; fail "the stack did not become healthy"; }
  echo "up and healthy in $(secs "$t0") s"

  say "a deployment run submitted from outside the containers"
  export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
  t0=$(date +%s)
  .venv/bin/prefect --no-prompt deploy -n compose > "$work/deploy.log" 2>&1 || { tail "$work/deploy.log" >&2; fail "prefect deploy -n compose"; }
  .venv/bin/prefect deployment run noisy-student/compose --watch > "$work/flowrun.log" 2>&1 \
    || { tail -30 "$work/flowrun.log" >&2; "${c[@]}" logs worker-cpu 2>&1 | tail -30 >&2; fail "the deployment run did not complete"; }
  echo "flow run completed in $(secs "$t0") s"
  "$repo/.venv/bin/python" docker/stack_check.py results || fail "MLflow runs or S3 artifacts missing"

  say "compose down -v"
  "${c[@]}" down -v > "$work/down.log" 2>&1 || { tail "$work/down.log" >&2; fail "compose down -v"; }
  trap cleanup EXIT
  local left; left=$("$engine" ps -a --format '{{.Names}}' | grep -E '^noisy-student[-_]' || true)
  [ -z "$left" ] || fail "containers left after down -v: $left"
  left=$("$engine" volume ls --format '{{.Name}}' | grep -E '^noisy-student[-_]' || true)
  [ -z "$left" ] || fail "volumes left after down -v: $left"
  echo "nothing left: no container, no volume of the stack"
}

if [ "$what" != stack ]; then build_image; check_image; fi
if [ "$what" != image ]; then check_stack; fi
say "docker/check.sh $what: all checks passed"
