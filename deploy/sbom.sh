#!/usr/bin/env bash
# Writes a CycloneDX SBOM (JSON, spec 1.5) for each of proxy-server, proxy-agent and proxy-test-client as built
# for ARCH: the crates compiled into that binary for that target (Cargo.lock versions, licenses, package URLs),
# without build-only dependencies. Uses cargo-cyclonedx (`cargo install --locked cargo-cyclonedx`), which reads
# `cargo metadata`: nothing is built. The release workflow attaches them to the GitHub release and to each
# architecture's image as a signed attestation (cosign attest --type cyclonedx).
#
#   deploy/sbom.sh [--arch ARCH] [--out DIR]     writes DIR/BIN.cdx.json (default DIR: target/sbom/ARCH)
#
# Timestamps come from SOURCE_DATE_EPOCH (default: the HEAD commit's time), so the same commit gives the same file.
set -euo pipefail

die() { echo "sbom.sh: FAILED: $*" >&2; exit 1; }

here=$PWD
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
arch="" out=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --arch) [[ $# -ge 2 ]] || die "--arch needs a value"; arch=$2; shift ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out=$(cd "$here" && realpath -m "$2"); shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
cd "$root"
cargo cyclonedx --version >/dev/null 2>&1 || die "cargo-cyclonedx not installed (cargo install --locked cargo-cyclonedx)"
arch=${arch:-$(case $(uname -m) in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac)}
target=$(deploy/static-build.sh --rust-target "$arch")
out=${out:-$root/target/sbom/$arch}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH

# cargo-cyclonedx writes NAME_bin.cdx.json next to each workspace crate's Cargo.toml; take ours, drop the rest.
generated=()
cleanup() { rm -f "${generated[@]}"; }
trap cleanup EXIT
cargo cyclonedx --quiet --format json --spec-version 1.5 --describe binaries --no-build-deps --target "$target" \
  || die "cargo cyclonedx for $target"
mapfile -t generated < <(find crates -mindepth 2 -maxdepth 2 -name '*_bin.cdx.json')
mkdir -p "$out"
for b in proxy-server proxy-agent proxy-test-client; do
  f=$(printf '%s\n' "${generated[@]}" | grep "/${b}_bin.cdx.json$") || die "cargo cyclonedx wrote no SBOM for $b"
  summary=$(python3 - "$f" "$b" <<'EOF'
import json, sys
bom = json.load(open(sys.argv[1]))
main = bom["metadata"]["component"]
assert bom["bomFormat"] == "CycloneDX" and main["name"] == sys.argv[2], "not a CycloneDX SBOM of " + sys.argv[2]
names = {c["name"] for c in bom.get("components", [])}
for banned in ("openssl-sys", "native-tls"):
    assert banned not in names, banned + " in the SBOM"
assert "rustls" in names and "ring" in names, "rustls/ring missing: wrong dependency graph?"
print(f"{len(names)} components, spec {bom['specVersion']}")
EOF
) || die "$f: unexpected content"
  mv "$f" "$out/$b.cdx.json"
  echo "$out/$b.cdx.json: $b for linux/$arch ($target): $summary"
done
