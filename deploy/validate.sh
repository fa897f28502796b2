#!/usr/bin/env bash
# Renders every overlay under deploy/kubernetes/overlays and checks the result, offline:
#   1. kustomize build of each overlay (and of egress-selector/);
#   2. kubeconform -strict against JSON schemas generated here from the Kubernetes Go types (k8s.io/api
#      v0.36.1): unknown fields and wrong types fail; nothing is downloaded;
#   3. deploy/validate objects: strict decoding with client-go's scheme, plus consistency checks (selectors,
#      volumes and mounts, ConfigMap references, probe ports = the binaries' health ports, hardening, image tag =
#      the workspace version, every file flag inside a mounted volume);
#   4. deploy/validate flags: each proxy-server/proxy-agent command line, expanded as the kubelet does, parsed by
#      our own binaries (every overlay must be accepted; a file a flag names that only exists on a node, such as
#      the projected token of --service-account-token-path, is replaced by an empty stand-in);
#   5. deploy/validate egress: the EgressSelectorConfiguration files through k8s.io/apiserver's loader and
#      validation, as kube-apiserver reads them;
#   6. kustomize build of the monitoring bundle (deploy/monitoring) and kubeconform -strict of its ConfigMap (its
#      PodMonitors and PrometheusRule are Prometheus Operator kinds without a schema here: deploy/monitoring/check.sh
#      checks the rules with promtool, tests/it/monitoring.rs their metrics against the binaries).
#
# Tools are built once from the Go module proxy into $KONNECTIVITY_DEPLOY_TOOLS (default
# ~/.cache/konnectivity-rs-deploy/bin), with `go build -p 1`. The binaries checked in step 4 are
# target/debug/proxy-{server,agent} (built if missing), or PROXY_SERVER_BIN / PROXY_AGENT_BIN.
set -euo pipefail

KUSTOMIZE_VERSION=v5.8.2     # v5.8.3 needs Go 1.27
KUBECONFORM_VERSION=v0.8.0

die() { echo "validate.sh: FAILED: $*" >&2; exit 1; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
command -v go >/dev/null || die "go not found"

tools=${KONNECTIVITY_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/konnectivity-rs-deploy/bin}
mkdir -p "$tools"
install_tool() { # NAME MODULE/PATH@VERSION
  local stamp="$tools/.$1.version"
  if [[ ! -x $tools/$1 || $(cat "$stamp" 2>/dev/null) != "$2" ]]; then
    echo "building $2"
    GOBIN=$tools GOFLAGS=-mod=mod go install -p 1 "$2" || die "go install $2"
    echo "$2" >"$stamp"
  fi
}
install_tool kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
install_tool kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
(cd deploy/validate && go build -p 1 -o "$tools/konnectivity-deploy-validate" .) || die "building deploy/validate"
validate=$tools/konnectivity-deploy-validate

server_bin=${PROXY_SERVER_BIN:-$root/target/debug/proxy-server}
agent_bin=${PROXY_AGENT_BIN:-$root/target/debug/proxy-agent}
if [[ ! -x $server_bin || ! -x $agent_bin ]]; then
  cargo build --locked --bin proxy-server --bin proxy-agent || die "cargo build"
fi

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
tag=v$version

work=$(mktemp -d /tmp/konnectivity-validate.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== 1. kustomize build ($("$tools/kustomize" version))"
rendered=()
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  "$tools/kustomize" build "$overlay" >"$work/$name.yaml" || die "kustomize build $overlay"
  echo "   $overlay -> $(grep -c '^kind:' "$work/$name.yaml") objects"
  rendered+=("$work/$name.yaml")
done
"$tools/kustomize" build deploy/kubernetes/egress-selector >"$work/egress-selector-configmap.yaml" \
  || die "kustomize build deploy/kubernetes/egress-selector"
[[ ${#rendered[@]} -ge 6 ]] || die "expected at least 6 overlays, found ${#rendered[@]}"

echo "== 2. kubeconform -strict, schemas from the Go types"
"$validate" schemas "$work/schemas"
"$tools/kubeconform" -strict -summary -output text \
  -schema-location "$work/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  "${rendered[@]}" "$work/egress-selector-configmap.yaml" || die "kubeconform"

echo "== 3. strict decoding and consistency checks"
"$validate" objects -tag "$tag" "${rendered[@]}" || die "object checks"

echo "== 4. command lines parsed by $server_bin and $agent_bin"
# Overlays written for a feature that has not landed yet (their binaries must refuse them with "not supported
# yet"): none today. List their names here, e.g. needs_feature=(some-overlay).
needs_feature=()
supported=() refused=()
for f in "${rendered[@]}"; do
  if [[ " ${needs_feature[*]} " == *" $(basename "$f" .yaml) "* ]]; then refused+=("$f"); else supported+=("$f"); fi
done
"$validate" flags -server "$server_bin" -agent "$agent_bin" "${supported[@]}" || die "flags"
if [[ ${#refused[@]} -gt 0 ]]; then
  "$validate" flags -expect-refused -server "$server_bin" -agent "$agent_bin" "${refused[@]}" \
    || die "flags (${needs_feature[*]})"
fi

echo "== 5. EgressSelectorConfiguration files (k8s.io/apiserver loader and validation)"
"$validate" egress deploy/kubernetes/egress-selector/*-*.yaml || die "egress selector files"

echo "== 6. monitoring bundle (deploy/monitoring)"
"$tools/kustomize" build deploy/monitoring >"$work/monitoring.yaml" || die "kustomize build deploy/monitoring"
kinds=$(grep '^kind:' "$work/monitoring.yaml" | sort | uniq -c | tr -s ' ' | paste -sd, -)
[[ $kinds == " 1 kind: ConfigMap, 2 kind: PodMonitor, 1 kind: PrometheusRule" ]] \
  || die "deploy/monitoring renders $kinds, expected a ConfigMap, 2 PodMonitors and a PrometheusRule"
"$tools/kubeconform" -strict -summary -output text -skip PodMonitor,PrometheusRule \
  -schema-location "$work/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  "$work/monitoring.yaml" || die "kubeconform deploy/monitoring"

echo
echo "validate.sh: all overlays valid (${#rendered[@]} rendered, image tag $tag)"
