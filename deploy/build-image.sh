#!/usr/bin/env bash
# Builds the proxy-server and proxy-agent images from static binaries (see deploy/Dockerfile), offline, for one
# or several architectures, and a manifest list (multi-arch image) per image.
#
#   deploy/build-image.sh [--arch LIST] [--prebuilt DIR] [--no-image] [--smoke] [--oci-dir DIR]
#
#   1. static release builds of proxy-server and proxy-agent for each architecture (deploy/static-build.sh: a
#      -linux-gnu Rust target with crt-static, cross-linked by Debian's gcc for a foreign one), checked with
#      file(1) and readelf(1) to be static and for that machine, and run (`--version`; under qemu-user when
#      foreign); staged in target/image-context (Dockerfile, bin/ARCH/, rootfs/), debug info stripped;
#   2. per architecture, an image REPO/NAME:TAG-ARCH built with buildah, podman or docker (IMAGE_TOOL to
#      choose), FROM scratch: no registry; then REPO/NAME:TAG, a manifest list of them (buildah and podman);
#   --arch LIST: comma-separated amd64, arm64, ppc64le, s390x, or `all` (default: this host's architecture);
#   --prebuilt DIR: no build; package DIR/ARCH/proxy-server and DIR/ARCH/proxy-agent (from
#      `deploy/static-build.sh --out DIR/ARCH`, e.g. the release workflow's binaries), checked as in step 1;
#   --smoke: runs the images' own root filesystems end to end on loopback (this host's architecture, which LIST
#      must include): server and agent as user 65532 in a chroot of the image (mounted with buildah), a request
#      through the tunnel with proxy-test-client, the agent finding the server and the target by DNS when
#      dnsmasq is installed (static glibc resolves with its built-in files/dns services);
#   --oci-dir DIR: also writes DIR/proxy-server-TAG.tar and DIR/proxy-agent-TAG.tar (OCI archives holding the
#      manifest list and every architecture's image; loadable with `podman load`, `ctr images import`, `kind load
#      image-archive`, `skopeo copy --all oci-archive:... docker://...`);
#   --no-image: step 1 only.
#
# Env: IMAGE_REPO (default ghcr.io/konnectivity-rs), TAG (default v<workspace version>), IMAGE_TOOL
# (buildah|podman|docker, default: the first found; docker: one architecture, no manifest list), STORAGE_DRIVER
# (buildah/podman, default vfs: works where overlay mounts are not allowed).
set -euo pipefail

die() { echo "build-image.sh: FAILED: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

here=$PWD
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

want_image=1 smoke=0 oci_dir="" prebuilt="" arch_list=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-image) want_image=0 ;;
    --smoke) smoke=1 ;;
    --oci-dir) [[ $# -ge 2 ]] || die "--oci-dir needs a directory"; oci_dir=$(cd "$here" && realpath -m "$2"); shift ;;
    --arch) [[ $# -ge 2 ]] || die "--arch needs a list"; arch_list=$2; shift ;;
    --prebuilt) [[ $# -ge 2 ]] || die "--prebuilt needs a directory"; prebuilt=$(cd "$here" && cd "$2" && pwd) \
                  || die "no directory $2"; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[[ $smoke == 0 || $want_image == 1 ]] || die "--smoke needs the images (drop --no-image)"
[[ -z ${CARGO_TARGET:-} ]] || die "CARGO_TARGET is gone: use --arch (amd64, arm64, ppc64le, s390x)"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[[ -n $version ]] || die "no version in Cargo.toml [workspace.package]"
repo=${IMAGE_REPO:-ghcr.io/konnectivity-rs}
tag=${TAG:-v$version}
case $(uname -m) in x86_64) host=amd64 ;; aarch64) host=arm64 ;; *) host=$(uname -m) ;; esac
[[ $arch_list != all ]] || arch_list=amd64,arm64,ppc64le,s390x
IFS=, read -r -a arches <<<"${arch_list:-$host}"
[[ ${#arches[@]} -gt 0 ]] || die "--arch: empty list"
[[ $smoke == 0 || " ${arches[*]} " == *" $host "* ]] || die "--smoke runs this host's architecture ($host): add it to --arch"
ctx=$root/target/image-context
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}

step "1. static binaries for ${arches[*]}, staged in $ctx"
rm -rf "$ctx"
mkdir -p "$ctx/bin"
cp deploy/Dockerfile "$ctx/Dockerfile"
cp -a deploy/image/rootfs "$ctx/rootfs"
for a in "${arches[@]}"; do
  from=()
  [[ -z $prebuilt ]] || from=(--from "$prebuilt/$a")
  deploy/static-build.sh --arch "$a" "${from[@]}" --out "$ctx/bin/$a" proxy-server proxy-agent
done
(cd "$ctx" && find . -type f -printf '%M %8s %p\n' | sort -k3)

[[ $want_image == 1 ]] || { echo; echo "build context ready (no image built: --no-image)"; exit 0; }

tool=${IMAGE_TOOL:-}
if [[ -z $tool ]]; then
  for t in buildah podman docker; do
    if command -v "$t" >/dev/null; then tool=$t; break; fi
  done
fi
[[ -n $tool ]] || die "no image tool: install buildah (apt-get install buildah) or podman or docker, or use --no-image"
case $tool in
  buildah|podman) imagetool() { "$tool" --storage-driver "$STORAGE_DRIVER" "$@"; } ;;
  docker) imagetool() { docker "$@"; } ;;
  *) die "IMAGE_TOOL=$tool: want buildah, podman or docker" ;;
esac
case $tool in
  buildah) build() { imagetool bud --layers=false "$@"; } ;;
  *) build() { imagetool build "$@"; } ;;
esac
[[ $tool != docker || ${#arches[@]} == 1 ]] || die "docker builds one architecture here (no manifest list): use buildah or podman"

step "2. images with $tool: ${arches[*]}"
for b in proxy-server proxy-agent; do
  for a in "${arches[@]}"; do
    # TARGETARCH selects bin/ARCH/ in the Dockerfile; buildah and BuildKit also set it from --platform.
    build --platform "linux/$a" --build-arg "TARGETARCH=$a" --target "$b" --build-arg "VERSION=$version" \
      -t "$repo/$b:$tag-$a" -f "$ctx/Dockerfile" "$ctx" || die "$tool could not build $repo/$b:$tag-$a"
    if [[ $tool != docker ]]; then
      cfg=$(imagetool inspect --format '{{.OCIv1.Config.Entrypoint}} user={{.OCIv1.Config.User}} {{.OCIv1.OS}}/{{.OCIv1.Architecture}}' "$repo/$b:$tag-$a" 2>/dev/null \
            || imagetool image inspect --format '{{.Config.Entrypoint}} user={{.Config.User}} {{.Os}}/{{.Architecture}}' "$repo/$b:$tag-$a")
      echo "$repo/$b:$tag-$a: entrypoint $cfg"
      [[ $cfg == "[/$b] user=65532:65532 linux/$a" ]] || die "$b image: unexpected entrypoint/user/platform: $cfg"
    fi
    if [[ $tool == buildah && $a == "$host" ]]; then
      c=$(imagetool from --pull=never "$repo/$b:$tag-$a")
      v=$(imagetool run --isolation chroot "$c" -- "/$b" --version) || die "$b does not run in its image"
      imagetool rm "$c" >/dev/null
      echo "buildah run $repo/$b:$tag-$a /$b --version: $v"
    fi
  done
  if [[ $tool == docker ]]; then
    docker tag "$repo/$b:$tag-${arches[0]}" "$repo/$b:$tag"
    continue
  fi
  # The manifest list REPO/NAME:TAG: what `buildah manifest push --all` sends to a registry.
  imagetool manifest rm "$repo/$b:$tag" >/dev/null 2>&1 || imagetool rmi "$repo/$b:$tag" >/dev/null 2>&1 || true
  imagetool manifest create "$repo/$b:$tag" >/dev/null
  for a in "${arches[@]}"; do
    imagetool manifest add "$repo/$b:$tag" "containers-storage:$repo/$b:$tag-$a" >/dev/null
  done
  platforms=$(imagetool manifest inspect "$repo/$b:$tag" | python3 -c 'import json,sys; print(" ".join(sorted(m["platform"]["os"] + "/" + m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"])))')
  echo "$repo/$b:$tag: manifest list of $platforms"
  want=$(printf 'linux/%s\n' "${arches[@]}" | sort | tr '\n' ' ')
  [[ "$platforms " == "$want" ]] || die "$repo/$b:$tag lists '$platforms', want '$want'"
done

if [[ -n $oci_dir ]]; then
  mkdir -p "$oci_dir"
  for b in proxy-server proxy-agent; do
    rm -f "$oci_dir/$b-$tag.tar"
    case $tool in
      docker) docker save -o "$oci_dir/$b-$tag.tar" "$repo/$b:$tag" ;;
      *) imagetool manifest push --all --format oci "$repo/$b:$tag" "oci-archive:$oci_dir/$b-$tag.tar:$repo/$b:$tag" >/dev/null ;;
    esac
  done
  ls -la "$oci_dir"
fi

[[ $smoke == 1 ]] || { echo; echo "built $repo/proxy-server:$tag and $repo/proxy-agent:$tag"; exit 0; }

# ---- smoke test: the images' root filesystems, as the kubelet would run them (minus the namespaces) ----------
[[ $tool == buildah ]] || die "--smoke mounts the images with buildah (IMAGE_TOOL=buildah)"
command -v python3 >/dev/null || die "--smoke needs python3 (HTTP target, free ports)"
step "3. smoke test: server and agent from their images, in chroots, as 65532:65532"
work=$(mktemp -d /tmp/konnectivity-image-smoke.XXXXXX)
pids=() containers=()
cleanup() {
  local p c
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for c in "${containers[@]}"; do
    buildah --storage-driver "$STORAGE_DRIVER" umount "$c" >/dev/null 2>&1 || true
    buildah --storage-driver "$STORAGE_DRIVER" rm "$c" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

client=${PROXY_TEST_CLIENT:-$root/target/debug/proxy-test-client}
if [[ ! -x $client ]]; then cargo build --locked --bin proxy-test-client; client=$root/target/debug/proxy-test-client; fi

read -r agent_port health_port admin_port agent_health agent_admin target_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

dns_ip="" server_host=localhost target_host=localhost
if command -v dnsmasq >/dev/null; then
  # A loopback DNS server that knows two names, so the agent resolves through glibc's DNS code.
  dns_ip=127.0.0.$((100 + RANDOM % 100))
  dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --listen-address="$dns_ip" --port=53 \
    --address=/konnectivity.test/127.0.0.1 --pid-file="$work/dnsmasq.pid" 2>"$work/dnsmasq.log" &
  pids+=($!)
  server_host=server.konnectivity.test target_host=target.konnectivity.test
else
  echo "(dnsmasq not installed: names resolve from /etc/hosts only; apt-get install dnsmasq-base for the DNS leg)"
fi

deploy/pki/gen-certs.sh "$work/pki" localhost 127.0.0.1 server.konnectivity.test >/dev/null
chmod 0644 "$work"/pki/*  # the smoke test's throwaway keys, read by uid 65532

mkdir -p "$work/www"
head -c 1048576 /dev/urandom >"$work/www/blob"
want=$(sha256sum <"$work/www/blob" | cut -d' ' -f1)
(cd "$work/www" && exec python3 -m http.server --bind 127.0.0.1 "$target_port" >"$work/http.log" 2>&1) &
pids+=($!)

# rootfs NAME IMAGE: a writable container NAME of IMAGE, mounted; prints the mount point. (It runs in a
# subshell, so the caller records NAME for the clean-up.)
rootfs() {
  local c=$1 m
  buildah --storage-driver "$STORAGE_DRIVER" from --pull=never --name "$c" "$2" >/dev/null
  m=$(buildah --storage-driver "$STORAGE_DRIVER" mount "$c")
  # What every container gets from its runtime and the kubelet: the OCI runtime's standard /dev nodes (the
  # binaries read /dev/urandom: glibc linked statically hides getrandom(3) from the getrandom crate's dlsym, so
  # it falls back to the device), /etc/hosts and /etc/resolv.conf; and the certificates, as a volume would.
  mkdir -p "$m/dev"
  mknod -m 0666 "$m/dev/null" c 1 3 && mknod -m 0666 "$m/dev/zero" c 1 5 \
    && mknod -m 0666 "$m/dev/random" c 1 8 && mknod -m 0666 "$m/dev/urandom" c 1 9 || die "mknod in $m/dev"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$m/etc/hosts"
  if [[ -n $dns_ip ]]; then echo "nameserver $dns_ip" >"$m/etc/resolv.conf"; else : >"$m/etc/resolv.conf"; fi
  mkdir -p "$m/pki" "$m/run/konnectivity"
  cp "$work"/pki/{ca.crt,server.crt,server.key,agent.crt,agent.key} "$m/pki/"
  chown 65532:65532 "$m/run/konnectivity"
  echo "$m"
}
containers+=("konnectivity-smoke-$$-server" "konnectivity-smoke-$$-agent")
srv=$(rootfs "konnectivity-smoke-$$-server" "$repo/proxy-server:$tag")
agt=$(rootfs "konnectivity-smoke-$$-agent" "$repo/proxy-agent:$tag")
echo "server rootfs: $(cd "$srv" && find . -xdev -type f | sort | tr '\n' ' ')"

NO_COLOR=1 chroot --userspec=65532:65532 "$srv" /proxy-server --uds-name=/run/konnectivity/konnectivity-server.socket \
  --server-port=0 --agent-port="$agent_port" --agent-bind-address=127.0.0.1 --health-port="$health_port" \
  --health-bind-address=127.0.0.1 --admin-port="$admin_port" --cluster-cert=/pki/server.crt \
  --cluster-key=/pki/server.key --cluster-ca-cert=/pki/ca.crt >"$work/server.log" 2>&1 &
pids+=($!)
NO_COLOR=1 chroot --userspec=65532:65532 "$agt" /proxy-agent --proxy-server-host="$server_host" \
  --proxy-server-port="$agent_port" --ca-cert=/pki/ca.crt --agent-cert=/pki/agent.crt --agent-key=/pki/agent.key \
  --health-server-host=127.0.0.1 --health-server-port="$agent_health" --admin-server-port="$agent_admin" \
  --sync-interval=200ms >"$work/agent.log" 2>&1 &
pids+=($!)

ready=""
for _ in $(seq 1 100); do
  if ready=$(python3 -c "import urllib.request,sys; print(urllib.request.urlopen('http://127.0.0.1:$health_port/readyz', timeout=1).read().decode())" 2>/dev/null); then break; fi
  ready=""
  sleep 0.1
done
if [[ -z $ready ]]; then
  echo "--- server log"; cat "$work/server.log"; echo "--- agent log"; cat "$work/agent.log"
  die "the server never became ready (no agent connected)"
fi
echo "server /readyz: $ready (an agent is connected; it dialed $server_host:$agent_port)"
agent_ready=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$agent_health/readyz?verbose', timeout=2).read().decode())")
echo "agent /readyz?verbose: $(echo "$agent_ready" | tr '\n' ' ')"

# The socket as kube-apiserver would reach it through the shared hostPath: a short path (sun_path is 108 bytes).
ln -s "$srv/run/konnectivity" "$work/uds"
got=$("$client" --proxy-uds="$work/uds/konnectivity-server.socket" --proxy-host= \
        --request-host="$target_host" --request-port="$target_port" --request-path=blob 2>"$work/client.log" \
        | sha256sum | cut -d' ' -f1) || true
if [[ $got != "$want" ]]; then
  echo "--- client log"; cat "$work/client.log"; echo "--- server log"; cat "$work/server.log"
  echo "--- agent log"; cat "$work/agent.log"
  die "the 1 MiB download through the tunnel did not match (got sha256 $got)"
fi
echo "GET http://$target_host:$target_port/blob through UDS -> server (chroot) -> agent (chroot): 1 MiB, sha256 ok"
ls -l "$srv/run/konnectivity/konnectivity-server.socket"
echo
echo "smoke test passed: $repo/proxy-server:$tag and $repo/proxy-agent:$tag"
