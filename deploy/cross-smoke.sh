#!/usr/bin/env bash
# Cross-architecture smoke test: builds static proxy-server, proxy-agent and proxy-test-client for ARCH
# (deploy/static-build.sh) and runs all three under qemu-user on this host, on loopback only:
#   1. `--help` of each binary (exit status 0 and its own flags in the text);
#   2. a tunnel: an ARCH proxy-server (gRPC frontend on a Unix socket, agent port with mTLS) and an ARCH
#      proxy-agent, a throwaway PKI (deploy/pki/gen-certs.sh), a python3 HTTP target, and the ARCH
#      proxy-test-client downloading 1 MiB through server and agent, checked by sha256.
#
#   deploy/cross-smoke.sh [--arch ARCH] [--release]
#
#   ARCH       amd64 | arm64 | ppc64le | s390x (default arm64); the host's own architecture runs natively
#   --release  test release binaries (default: the dev profile, several times faster to build; the code paths
#              under test are the same, the optimiser is not)
#
# Needs what deploy/static-build.sh --deps ARCH lists, plus openssl and python3. Fails with the logs of every
# process on any error. Env: SMOKE_TIMEOUT (seconds for the server to see the agent, default 60: qemu is slow).
set -euo pipefail

die() { echo "cross-smoke.sh: FAILED: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

arch=arm64 profile=dev
while [[ $# -gt 0 ]]; do
  case $1 in
    --arch) [[ $# -ge 2 ]] || die "--arch needs a value"; arch=$2; shift ;;
    --release) profile=release ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
for t in openssl python3 sha256sum timeout; do command -v $t >/dev/null || die "$t not found"; done
build_args=()
[[ $profile == release ]] || build_args=(--dev)
bin=$root/target/static/$arch-$profile
start=$SECONDS

step "1. static $arch binaries ($profile profile)"
deploy/static-build.sh --arch "$arch" "${build_args[@]}" --out "$bin" proxy-server proxy-agent proxy-test-client
run=$(deploy/static-build.sh --runner "$arch")
build_s=$((SECONDS - start))
# on ARCH: runs an ARCH binary from $bin (under qemu-user unless ARCH is the host's).
on() { local b=$1; shift; ${run:+"$run"} "$bin/$b" "$@"; }

step "2. --help of each binary${run:+ under $(basename "$run")}"
for pair in proxy-server:--agent-port proxy-agent:--proxy-server-host proxy-test-client:--proxy-uds; do
  b=${pair%%:*} flag=${pair#*:}
  help=$(on "$b" --help 2>&1) || die "$b --help exited with status $?: $help"
  [[ $help == *"$flag"* ]] || die "$b --help does not mention $flag: $help"
  echo "$b --help: ok ($(wc -l <<<"$help") lines, mentions $flag)"
done

step "3. tunnel on loopback: $arch server and agent${run:+ under $(basename "$run")}, $arch test client"
# A short directory: the server's Unix socket path must fit in sun_path (108 bytes).
work=$(mktemp -d /tmp/xsmoke.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
logs() {
  local f
  for f in "$work"/*.log; do echo "--- $(basename "$f")"; cat "$f"; done
}
fail() { logs; die "$*"; }

read -r agent_port health_port admin_port agent_health agent_admin target_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

deploy/pki/gen-certs.sh "$work/pki" localhost 127.0.0.1 >/dev/null
mkdir -p "$work/www"
head -c 1048576 /dev/urandom >"$work/www/blob"
want=$(sha256sum <"$work/www/blob" | cut -d' ' -f1)
(cd "$work/www" && exec python3 -m http.server --bind 127.0.0.1 "$target_port" >"$work/http.log" 2>&1) &
pids+=($!)

NO_COLOR=1 on proxy-server --uds-name="$work/s.sock" --server-port=0 --agent-port="$agent_port" \
  --agent-bind-address=127.0.0.1 --health-port="$health_port" --health-bind-address=127.0.0.1 \
  --admin-port="$admin_port" --cluster-cert="$work/pki/server.crt" --cluster-key="$work/pki/server.key" \
  --cluster-ca-cert="$work/pki/ca.crt" >"$work/server.log" 2>&1 &
pids+=($!)
NO_COLOR=1 on proxy-agent --proxy-server-host=localhost --proxy-server-port="$agent_port" \
  --ca-cert="$work/pki/ca.crt" --agent-cert="$work/pki/agent.crt" --agent-key="$work/pki/agent.key" \
  --health-server-host=127.0.0.1 --health-server-port="$agent_health" --admin-server-port="$agent_admin" \
  --sync-interval=200ms >"$work/agent.log" 2>&1 &
pids+=($!)

# /readyz of the server answers 200 once an agent is connected.
up=$SECONDS ready=""
while [[ -z $ready ]] && ((SECONDS - up < ${SMOKE_TIMEOUT:-60})); do
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "a process exited early (pid $p)"; done
  ready=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$health_port/readyz', timeout=1).read().decode())" 2>/dev/null) \
    || { ready=""; sleep 0.2; }
done
[[ -n $ready ]] || fail "the server did not see the agent within ${SMOKE_TIMEOUT:-60} s"
echo "server /readyz after $((SECONDS - up)) s: $ready"

got=$(timeout 120 "${run:-env}" "$bin/proxy-test-client" --proxy-uds="$work/s.sock" --proxy-host= \
        --request-host=127.0.0.1 --request-port="$target_port" --request-path=blob 2>"$work/client.log" \
        | sha256sum | cut -d' ' -f1) || true
[[ $got == "$want" ]] || fail "the 1 MiB download through the tunnel did not match (sha256 $got, want $want)"
echo "GET http://127.0.0.1:$target_port/blob: client -> UDS (gRPC) -> server -> mTLS -> agent -> target: 1 MiB, sha256 ok"

echo
echo "cross smoke test passed: linux/$arch ($profile) proxy-server, proxy-agent, proxy-test-client;" \
  "build ${build_s} s, run $((SECONDS - start - build_s)) s"
