#!/usr/bin/env bash
# Builds static Linux binaries of proxy-server, proxy-agent and proxy-test-client for one architecture, on any
# Linux host with Debian's (or Ubuntu's) cross compilers: a Rust -linux-gnu target with crt-static, glibc linked
# in, linked by the architecture's gcc. Checks that each binary is static and for the right machine, and that it
# runs (`--version`; under qemu-user for a foreign architecture), then copies them, debug info stripped, to OUT.
#
#   deploy/static-build.sh [--arch ARCH] [--dev] [--out DIR] [--from DIR] [BIN...]
#   deploy/static-build.sh --runner ARCH     prints the command that runs ARCH binaries here (empty: natively)
#   deploy/static-build.sh --deps ARCH       prints the Debian packages ARCH needs here (cross gcc, qemu-user)
#   deploy/static-build.sh --rust-target ARCH  prints ARCH's Rust target triple
#
#   ARCH    amd64 | arm64 | ppc64le | s390x (the OCI names; default: this host's)
#   --dev   the dev profile (much faster to build; for smoke tests) instead of release
#   --out   default target/static/ARCH-PROFILE; gets BIN... (default: all three binaries)
#   --from  no build: check (and copy to --out, as they are) the binaries in DIR, e.g. from an earlier run or CI job
#
# Needs: rustup (adds the Rust target if missing), the cross gcc and its libc6-dev (`--deps ARCH` names them),
# file(1), readelf(1), and for a foreign ARCH qemu-user-static or qemu-user.
set -euo pipefail

die() { echo "static-build.sh: FAILED: $*" >&2; exit 1; }

host_arch() {
  case $(uname -m) in
    x86_64) echo amd64 ;; aarch64) echo arm64 ;; ppc64le) echo ppc64le ;; s390x) echo s390x ;;
    *) die "unsupported host machine $(uname -m)" ;;
  esac
}

# arch_info ARCH: sets rust_target, gnu (the GNU triple of its gcc/binutils), deb (Debian's name of the
# architecture), qemu (qemu-user's name), elf (what file(1) says of the machine).
arch_info() {
  case $1 in
    amd64) rust_target=x86_64-unknown-linux-gnu gnu=x86_64-linux-gnu deb=amd64 qemu=x86_64 elf='x86-64' ;;
    arm64) rust_target=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu deb=arm64 qemu=aarch64 elf='ARM aarch64' ;;
    ppc64le) rust_target=powerpc64le-unknown-linux-gnu gnu=powerpc64le-linux-gnu deb=ppc64el qemu=ppc64le \
               elf='64-bit PowerPC' ;;
    s390x) rust_target=s390x-unknown-linux-gnu gnu=s390x-linux-gnu deb=s390x qemu=s390x elf='IBM S/390' ;;
    *) die "unknown architecture '$1' (want amd64, arm64, ppc64le or s390x)" ;;
  esac
}

# runner ARCH: the command prefix that runs an ARCH binary on this host.
runner() {
  arch_info "$1"
  [[ $1 != "$(host_arch)" ]] || return 0
  local q
  for q in "qemu-$qemu-static" "qemu-$qemu"; do
    if command -v "$q" >/dev/null; then command -v "$q"; return 0; fi
  done
  die "no qemu-$qemu-static or qemu-$qemu to run $1 binaries here (apt-get install qemu-user-static)"
}

# deps ARCH: Debian packages for building (and running) ARCH binaries on this host.
deps() {
  arch_info "$1"
  if [[ $1 == "$(host_arch)" ]]; then echo "gcc libc6-dev file binutils"; return; fi
  echo "gcc-$gnu libc6-dev-$deb-cross binutils-$gnu qemu-user-static file binutils"
}

arch=$(host_arch) profile=release out="" from="" bins=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --arch) [[ $# -ge 2 ]] || die "--arch needs a value"; arch=$2; shift ;;
    --dev) profile=dev ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out=$2; shift ;;
    --from) [[ $# -ge 2 ]] || die "--from needs a directory"; from=$2; shift ;;
    --runner) [[ $# -ge 2 ]] || die "--runner needs an architecture"; runner "$2"; exit 0 ;;
    --deps) [[ $# -ge 2 ]] || die "--deps needs an architecture"; deps "$2"; exit 0 ;;
    --rust-target) [[ $# -ge 2 ]] || die "--rust-target needs an architecture"; arch_info "$2"; echo "$rust_target"; exit 0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) die "unknown argument $1 (see --help)" ;;
    *) bins+=("$1") ;;
  esac
  shift
done
[[ ${#bins[@]} -gt 0 ]] || bins=(proxy-server proxy-agent proxy-test-client)
arch_info "$arch"
# Paths given are relative to the caller's directory.
[[ -z $from ]] || from=$(cd "$from" && pwd) || die "no directory $from"
[[ -z $out ]] || { mkdir -p "$out" && out=$(cd "$out" && pwd); } || die "cannot create $out"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${out:-$root/target/static/$arch-$profile}
run=$(runner "$arch")

if [[ -z $from ]] && command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$rust_target"; then
  rustup target add "$rust_target" || die "rustup target add $rust_target"
fi
cc=gcc strip_tool=strip
if [[ $arch != "$(host_arch)" ]]; then
  cc=$gnu-gcc strip_tool=$gnu-strip
  [[ -n $from ]] || command -v "$cc" >/dev/null || die "no $cc: apt-get install $(deps "$arch")"
  [[ -n $from ]] || command -v "$strip_tool" >/dev/null || die "no $strip_tool: apt-get install binutils-$gnu"
fi
for t in file readelf; do command -v $t >/dev/null || die "no $t (apt-get install file binutils)"; done

# Cargo's per-target settings, so that build scripts and proc macros (host code) are untouched. RUSTFLAGS from
# the caller win over these in cargo; keep crt-static there too if you set it.
env_triple=$(echo "$rust_target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${env_triple}_LINKER=$cc"
export "CARGO_TARGET_${env_triple}_RUSTFLAGS=-C target-feature=+crt-static"
export "CC_${rust_target//-/_}=$cc"  # ring's C and assembly

if [[ -n $from ]]; then
  echo "== static binaries for linux/$arch from $from (no build)"
  built=$from
else
  bin_args=()
  for b in "${bins[@]}"; do bin_args+=(--bin "$b"); done
  profile_args=() profile_dir=debug
  [[ $profile == dev ]] || { profile_args=(--release); profile_dir=release; }
  echo "== static build: ${bins[*]} for linux/$arch ($rust_target, $profile profile, linker $cc)"
  start=$SECONDS
  cargo build --locked "${profile_args[@]}" --target "$rust_target" "${bin_args[@]}" \
    || die "cargo build for $rust_target"
  echo "built in $((SECONDS - start)) s"
  built=$root/target/$rust_target/$profile_dir
fi

mkdir -p "$out"
for b in "${bins[@]}"; do
  f=$built/$b
  [[ -f $f ]] || die "no $f"
  desc=$(file -b "$f")
  echo "$b: $desc"
  [[ $desc == *"static-pie linked"* || $desc == *"statically linked"* ]] || die "$b is not statically linked"
  [[ $desc == *"$elf"* ]] || die "$b is not a $arch ($elf) binary"
  # No program interpreter and no shared libraries: what ldd(1) would say, for any machine.
  if readelf -lW "$f" | grep -q 'Requesting program interpreter'; then die "$b asks for a program interpreter"; fi
  if readelf -dW "$f" | grep -q '(NEEDED)'; then die "$b needs shared libraries: $(readelf -dW "$f" | grep NEEDED)"; fi
  if [[ -n $from ]]; then
    [[ $f -ef $out/$b ]] || cp "$f" "$out/$b" || die "cp $f $out"
  else
    # Keep the symbols (panics and backtraces name functions), drop the DWARF line tables.
    "$strip_tool" --strip-debug -o "$out/$b" "$f" || die "$strip_tool $b"
  fi
  chmod 0755 "$out/$b"
  v=$(${run:+"$run"} "$out/$b" --version) || die "$b does not run${run:+ under $run}"
  echo "$b: runs${run:+ under $(basename "$run")}: $v"
done
echo "static $arch binaries in $out"
