#!/usr/bin/env bash
# Builds the real control-plane binaries the end-to-end fixture runs:
#   kube-apiserver, kubectl   k8s.io/kubernetes (version in go.mod)
#   etcd                      go.etcd.io/etcd/server/v3 via ./cmd/etcd
# from the Go module proxy, into a cache outside the repository:
#   ${KONNECTIVITY_CACHE:-$HOME/.cache/konnectivity-rs}/controlplane/<go.sum hash>/
# so a clean clone on the same machine reuses them. Prints that directory last.
#
# A cold build takes several minutes on two cores (kube-apiserver is large);
# a warm run only checks that the binaries exist.
#
# Usage: ./build.sh [--force]      Env: BUILD_JOBS (default 2) -> go build -p
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
command -v go >/dev/null || { echo "controlplane/build.sh: 'go' not found in PATH" >&2; exit 1; }

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

export CGO_ENABLED=0
jobs="${BUILD_JOBS:-2}"
# Stamp the release version, as the Kubernetes release build does: without it the binaries call themselves
# v0.0.0-master, and kube-apiserver derives its emulation version and kubectl its skew checks from it.
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)
[[ $k8s_version =~ ^v1\.([0-9]+)\. ]] || { echo "controlplane/build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
minor=${BASH_REMATCH[1]}
ldflags="-s"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
key=$(cat go.mod go.sum cmd/etcd/main.go build.sh | sha256sum | cut -c1-16)
out="${KONNECTIVITY_CACHE:-$HOME/.cache/konnectivity-rs}/controlplane/$key"
mkdir -p "$out"
# Tests may run this concurrently: one builds, the others wait for it.
exec 9>"$out/.lock"
flock 9

build() {
  local name=$1 pkg=$2
  if [[ $force == 1 || ! -x $out/$name ]]; then
    echo "controlplane/build.sh: go build -o $out/$name $pkg" >&2
    local start=$SECONDS
    # -mod=readonly: fail loudly instead of silently editing go.mod/go.sum.
    go build -mod=readonly -buildvcs=false -trimpath -p "$jobs" -ldflags="$ldflags" -o "$out/$name.tmp" "$pkg"
    mv "$out/$name.tmp" "$out/$name"
    echo "controlplane/build.sh:   done in $((SECONDS - start))s" >&2
  fi
}

build etcd           ./cmd/etcd
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kubectl        k8s.io/kubernetes/cmd/kubectl

"$out/etcd" --version 2>&1 | sed -n 1p >&2
"$out/kube-apiserver" --version >&2
echo "$out"
