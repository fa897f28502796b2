#!/usr/bin/env bash
# Builds the Go side of the interop kit into interop/bin/:
#   proxy-server, proxy-agent, proxy-test-client  reference ANP v0.36.0 commands
#   grpc-client, egress-client                    our small Go clients (cmd/)
#   anp-tests                                     the reference's own integration suite (package
#                                                 tests): a guard that runs the test binary
#                                                 (go test -c, bin/anp-tests.bin) only inside a
#                                                 named network namespace, where crates/konnectivity-it
#                                                 runs it against our agent
# Versions come from interop/go.mod (+ go.sum), so the reference binaries are
# built from the module proxy copies pinned there, never from a checkout.
#
# A binary is rebuilt only if it is missing or older than go.mod, go.sum,
# this script, or (for our own clients) its cmd/<name>/ sources.
#
# Usage: ./build.sh [--force]
# Env:   BUILD_JOBS (default 1) -> go build -p; keep it low on shared machines.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

command -v go >/dev/null || { echo "build.sh: 'go' not found in PATH" >&2; exit 1; }

export CGO_ENABLED=0
jobs="${BUILD_JOBS:-1}"
anp=sigs.k8s.io/apiserver-network-proxy

mkdir -p bin

# needs_build BIN DEP... : true if BIN is missing or any DEP is newer.
needs_build() {
  local bin=$1; shift
  [[ $force == 1 || ! -x $bin ]] && return 0
  [[ -n $(find "$@" -newer "$bin" -print -quit) ]]
}

# build NAME PACKAGE DEP...       go build
# build_test NAME PACKAGE DEP...  go test -c: a package's test binary
build() { compile build "$@"; }
build_test() { compile "test -c" "$@"; }

compile() {
  local verb=$1 name=$2 pkg=$3; shift 3
  local out=bin/$name
  if needs_build "$out" go.mod go.sum build.sh "$@"; then
    echo "build.sh: go $verb -o $out $pkg"
    local start=$SECONDS
    # -mod=readonly: fail loudly instead of silently editing go.mod/go.sum.
    # shellcheck disable=SC2086 # $verb is one or two words on purpose
    go $verb -mod=readonly -buildvcs=false -trimpath -p "$jobs" -o "$out" "$pkg"
    echo "build.sh:   done in $((SECONDS - start))s"
  else
    echo "build.sh: up to date: $out"
  fi
}

build proxy-server      "$anp/cmd/server"
build proxy-agent       "$anp/cmd/agent"
build proxy-test-client "$anp/cmd/test-client"
build grpc-client       ./cmd/grpc-client   cmd/grpc-client
build egress-client     ./cmd/egress-client cmd/egress-client
build_test anp-tests.bin "$anp/tests"

# The suite dials 198.18.0.254 and resolves a name that must not exist: on the host network those would leave
# the machine. bin/anp-tests starts the suite only inside a named network namespace (`ip netns identify`); the
# reference_suite test runs it with `ip netns exec` in one it builds (docs/interop.md).
cat >bin/anp-tests.new <<'GUARD'
#!/bin/sh
# Written by interop/build.sh: runs the reference's suite (anp-tests.bin) only inside a named network namespace
# (`ip netns exec <name> ...`), never on the host network, because it dials 198.18.0.254 and resolves a name that
# must not exist.
ns=$(ip netns identify "$$" 2>/dev/null)
if [ -z "$ns" ]; then
  echo "anp-tests: refusing to run outside a network namespace of its own (it dials 198.18.0.254 and resolves" >&2
  echo "anp-tests: a bogus name); cargo test -p konnectivity-it --test it reference_suite:: builds one (docs/interop.md)" >&2
  exit 2
fi
exec "$(dirname "$0")/anp-tests.bin" "$@"
GUARD
chmod 755 bin/anp-tests.new
mv -f bin/anp-tests.new bin/anp-tests

echo "build.sh: all binaries in $(pwd)/bin are up to date"
