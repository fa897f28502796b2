#!/usr/bin/env bash
# Go-only smoke test of the interop kit: reference ANP proxy-server + agent,
# our grpc-client / egress-client and the reference proxy-test-client, all on
# loopback, with a throwaway CA. Exits non-zero on the first failed check.
# Needs: ./build.sh done, openssl, python3, curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TMP=$(mktemp -d /tmp/knp-interop-smoke.XXXXXX)
pids=()
# The Go agent only drains on the first SIGTERM and exits on the second.
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

step() { echo "--- $*"; }
die() { echo "FAIL: $*" >&2; echo "logs: $TMP" >&2; KEEP_TMP=1; exit 1; }
expect_eq() { [[ $1 == "$2" ]] || die "$3: got [$1], want [$2]"; echo "ok: $3"; }
expect_fail_grep() { # PATTERN DESCRIPTION CMD...
  local pat=$1 what=$2 err; shift 2
  if err=$("$@" 2>&1 >/dev/null); then die "$what: command succeeded"; fi
  grep -q -- "$pat" <<<"$err" || die "$what: stderr lacks '$pat': $err"
  echo "ok: $what ($(grep -o -- "$pat" <<<"$err" | head -1))"
}

# The Go proxy-server rejects ports > 49151 ("ephemeral") and < 1024, so pick
# free ports in 20000-32000 (below Linux's default ephemeral range, and far
# from the 8090-8095 defaults).
freeport() {
  python3 -c '
import random, socket
while True:
    p = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError: pass
    finally: s.close()'
}
SERVER_PORT=$(freeport) AGENT_PORT=$(freeport) HEALTH_PORT=$(freeport) ADMIN_PORT=$(freeport)
AGENT_HEALTH=$(freeport) AGENT_ADMIN=$(freeport) WEB_PORT=$(freeport) ECHO_PORT=$(freeport)

step "throwaway CA + certs in $TMP"
(
  cd "$TMP"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=interop-ca -keyout ca.key -out ca.crt 2>/dev/null
  for n in server client; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$n" -keyout $n.key -out $n.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >$n.ext
    openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile $n.ext -out $n.crt 2>/dev/null
  done
  mkdir www && echo "hello from the cluster network" >www/file
  head -c 1048576 /dev/urandom >www/big
)

step "start proxy-server (UDS frontend + mTLS TCP frontend), agent, targets"
bin/proxy-server --mode=grpc --uds-name="$TMP/s.sock" --server-port=0 \
  --cluster-cert="$TMP/server.crt" --cluster-key="$TMP/server.key" --cluster-ca-cert="$TMP/ca.crt" \
  --agent-port="$AGENT_PORT" --agent-bind-address=127.0.0.1 \
  --health-port="$HEALTH_PORT" --health-bind-address=127.0.0.1 \
  --admin-port="$ADMIN_PORT" --admin-bind-address=127.0.0.1 >"$TMP/server-uds.log" 2>&1 &
pids+=($!)
# A second server for the mTLS TCP frontend: one server process has either a
# UDS or a TCP frontend, never both. The agent connects to the UDS one only.
TCP_AGENT_PORT=$(freeport) TCP_HEALTH=$(freeport) TCP_ADMIN=$(freeport)
bin/proxy-server --mode=grpc --server-port="$SERVER_PORT" --server-bind-address=127.0.0.1 \
  --server-cert="$TMP/server.crt" --server-key="$TMP/server.key" --server-ca-cert="$TMP/ca.crt" \
  --cluster-cert="$TMP/server.crt" --cluster-key="$TMP/server.key" --cluster-ca-cert="$TMP/ca.crt" \
  --agent-port="$TCP_AGENT_PORT" --agent-bind-address=127.0.0.1 \
  --health-port="$TCP_HEALTH" --health-bind-address=127.0.0.1 \
  --admin-port="$TCP_ADMIN" --admin-bind-address=127.0.0.1 >"$TMP/server-tcp.log" 2>&1 &
pids+=($!)
agent() { # SERVER_AGENT_PORT HEALTH ADMIN LOG
  bin/proxy-agent --ca-cert="$TMP/ca.crt" --agent-cert="$TMP/client.crt" --agent-key="$TMP/client.key" \
    --proxy-server-host=127.0.0.1 --proxy-server-port="$1" \
    --health-server-host=127.0.0.1 --health-server-port="$2" \
    --admin-bind-address=127.0.0.1 --admin-server-port="$3" >"$4" 2>&1 &
  pids+=($!)
}
agent "$AGENT_PORT" "$AGENT_HEALTH" "$AGENT_ADMIN" "$TMP/agent-uds.log"
UDS_AGENT_PID=${pids[-1]}
agent "$TCP_AGENT_PORT" "$(freeport)" "$(freeport)" "$TMP/agent-tcp.log"
python3 -m http.server --bind 127.0.0.1 --directory "$TMP/www" "$WEB_PORT" >"$TMP/web.log" 2>&1 &
pids+=($!)
python3 -c '
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while (d := self.request.recv(65536)):
            self.request.sendall(d)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()' "$ECHO_PORT" &
pids+=($!)

wait_port() { # PORT: until something accepts TCP connections on 127.0.0.1:PORT
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  die "nothing listens on 127.0.0.1:$1"
}
wait_port "$WEB_PORT"
wait_port "$ECHO_PORT"
# /readyz on the server's health port turns 200 once an agent is connected.
for hp in "$HEALTH_PORT" "$TCP_HEALTH"; do
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$hp/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "http://127.0.0.1:$hp/readyz" >/dev/null || die "server with health port $hp never became ready"
done
BIG="$(stat -c %s "$TMP/www/big") $(sha256sum "$TMP/www/big" | cut -d' ' -f1)"

step "grpc-client over UDS"
expect_eq "$(bin/grpc-client --uds "$TMP/s.sock" --target "127.0.0.1:$WEB_PORT" --path /file)" \
  "hello from the cluster network" "http GET /file"
expect_eq "$(bin/grpc-client --uds "$TMP/s.sock" --target "127.0.0.1:$WEB_PORT" --path /big --mode sha256 --count 3 | sort -u)" \
  "$BIG" "sha256 of 1 MiB, 3 fresh tunnels"
expect_eq "$(bin/grpc-client --uds "$TMP/s.sock" --target "127.0.0.1:$ECHO_PORT" --mode echo --data ping)" \
  "ping" "echo"
expect_fail_grep "connection refused" "dial to a closed port" \
  bin/grpc-client --uds "$TMP/s.sock" --target 127.0.0.1:1

step "grpc-client over mTLS TCP"
TLS=(--ca-cert "$TMP/ca.crt" --client-cert "$TMP/client.crt" --client-key "$TMP/client.key")
expect_eq "$(bin/grpc-client --tcp "127.0.0.1:$SERVER_PORT" "${TLS[@]}" --target "127.0.0.1:$WEB_PORT" --path /file)" \
  "hello from the cluster network" "http GET /file via 127.0.0.1"
expect_eq "$(bin/grpc-client --tcp "localhost:$SERVER_PORT" "${TLS[@]}" --target "127.0.0.1:$ECHO_PORT" --mode echo --size 3000000)" \
  "$(python3 -c '
import hashlib; b = bytes((i*7 + i//251) & 255 for i in range(3000000))
print(len(b), hashlib.sha256(b).hexdigest())')" "echo 3 MB via localhost"

step "egress-client (kube-apiserver egressselector, GRPC over UDS)"
cat >"$TMP/egress.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: GRPC
    transport:
      uds:
        udsName: $TMP/s.sock
EOF
expect_eq "$(bin/egress-client --config "$TMP/egress.yaml" --url "http://127.0.0.1:$WEB_PORT/file")" \
  "hello from the cluster network" "egress GET /file"
expect_eq "$(bin/egress-client --config "$TMP/egress.yaml" --url "http://127.0.0.1:$WEB_PORT/big" --sha256 --count 2 | sort -u)" \
  "$BIG" "egress sha256, 2 requests"

step "reference proxy-test-client over UDS"
bin/proxy-test-client --mode=grpc --proxy-uds="$TMP/s.sock" --proxy-host="" --proxy-port=0 \
  --request-host=127.0.0.1 --request-port="$WEB_PORT" --request-path=file 2>"$TMP/test-client.log" ||
  die "proxy-test-client failed"
# It logs the body through klog on stderr, after an "HTML Response:" line.
grep -A1 "HTML Response:" "$TMP/test-client.log" | grep -q "hello from the cluster network" ||
  die "proxy-test-client: body not in its log"
echo "ok: proxy-test-client GET /file"

step "failure texts"
kill "$UDS_AGENT_PID"; sleep 0.3; kill "$UDS_AGENT_PID"; wait "$UDS_AGENT_PID" || true
sleep 0.5
expect_fail_grep "No agent available" "no agent connected" \
  bin/grpc-client --uds "$TMP/s.sock" --target "127.0.0.1:$WEB_PORT"
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$TMP/stale.sock"
expect_fail_grep "connection refused" "stale socket, --fail-fast" \
  bin/grpc-client --uds "$TMP/stale.sock" --target "127.0.0.1:$WEB_PORT" --fail-fast
expect_fail_grep "no such file or directory" "missing socket, retried until --timeout" \
  bin/grpc-client --uds "$TMP/missing.sock" --target "127.0.0.1:$WEB_PORT" --timeout 2s

echo "smoke-go: all checks passed"
