#!/usr/bin/env bash
# Prints, as Markdown, the flag-by-flag comparison of proxy-server and proxy-agent with the reference (v0.36.0)
# that docs/migration.md carries, generated from the binaries themselves so that it cannot drift:
#   - the flags and defaults come from each binary's --help (ours: clap; the reference: pflag);
#   - the "konnectivity-rs" column comes from running OUR binary with the flag set to a value that uses its
#     feature (for a boolean, the opposite of its default; some flags are tried with several values), on top
#     of a minimal command line whose certificate files do not exist: exit status 2 means the flag was refused
#     (with "not supported yet", or as an invalid value), except when the only complaint is that the
#     /nonexistent/ file a probe names does not exist (--kubeconfig, --service-account-token-path are checked at
#     parse time); anything else means it was accepted and the binary went on to start (and stopped at the
#     missing files). Nothing listens or dials: flags are validated
#     before any file is read, and the probes run in an empty network namespace when `unshare` allows.
#
#   deploy/flag-table.sh                       print the tables
#   deploy/flag-table.sh --check FILE          fail if FILE's block between the flag-table markers differs
#   deploy/flag-table.sh --write FILE          replace that block in FILE
#
# Binaries: target/debug/proxy-{server,agent} (PROXY_SERVER_BIN, PROXY_AGENT_BIN), built if missing; the
# reference's from interop/bin (REF_BIN_DIR), built with interop/build.sh if missing.
set -euo pipefail

die() { echo "flag-table.sh: FAILED: $*" >&2; exit 1; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

mode=print file=""
case ${1:-} in
  "") ;;
  --check|--write) [[ $# -eq 2 ]] || die "$1 needs a file"; mode=${1#--}; file=$2 ;;
  *) die "usage: $0 [--check FILE | --write FILE]" ;;
esac

server=${PROXY_SERVER_BIN:-$root/target/debug/proxy-server}
agent=${PROXY_AGENT_BIN:-$root/target/debug/proxy-agent}
if [[ ! -x $server || ! -x $agent ]]; then cargo build --locked --bin proxy-server --bin proxy-agent >&2; fi
ref=${REF_BIN_DIR:-$root/interop/bin}
if [[ ! -x $ref/proxy-server || ! -x $ref/proxy-agent ]]; then
  [[ -z ${REF_BIN_DIR:-} ]] || die "no proxy-server/proxy-agent in REF_BIN_DIR=$ref"
  BUILD_JOBS=1 interop/build.sh >&2 || die "interop/build.sh (builds the reference binaries)"
fi
command -v python3 >/dev/null || die "python3 not found"

isolate=""
if unshare --net true 2>/dev/null; then isolate="unshare --net --"; fi

table=$(SERVER="$server" AGENT="$agent" REF="$ref" ISOLATE="$isolate" python3 - <<'PY'
import os, re, shlex, subprocess, tempfile

ISOLATE = shlex.split(os.environ["ISOLATE"])

def run(cmd):
    with tempfile.TemporaryDirectory() as d:
        env = {"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "RUST_LOG": "off"}
        try:
            p = subprocess.run(ISOLATE + cmd, cwd=d, env=env, capture_output=True, text=True, timeout=10)
            return p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            return -1, "still running"

def ours_help(binary):
    """clap --help: '      --name <VAL>' or '--name[=<X>]' then indented description with [default: X]."""
    text = run([binary, "--help"])[1]
    flags, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^ {2,6}(?:-\w, )?--([a-z0-9-]+)(?:[ \[=<].*)?$", line)
        if m:
            cur = m.group(1)
            flags[cur] = {"desc": "", "bool": "possible values: true, false" in line}
            continue
        if cur and line.strip():
            flags[cur]["desc"] += " " + line.strip()
    for name, f in flags.items():
        d = re.search(r"\[default: ([^\]]*)\]", f["desc"])
        f["default"] = d.group(1) if d else None
        f["bool"] = f["bool"] or "possible values: true, false" in f["desc"]
    flags.pop("help", None); flags.pop("version", None)
    return flags

ZERO = {"string": '""', "strings": '""', "int": "0", "uint": "0", "float32": "0", "duration": "0s", "": "false"}

def ref_help(binary):
    """pflag --help: '      --name type   description (default X)'."""
    text = run([binary, "--help"])[1]
    flags = {}
    for line in text.splitlines():
        m = re.match(r"^ {2,6}(?:-\w, )?--([a-z0-9-]+)(?: ([a-zA-Z0-9]+))?\s{2,}(.*)$", line)
        if not m:
            continue
        name, typ, desc = m.group(1), m.group(2) or "", m.group(3)
        d = re.search(r"\(default (.*)\)$", desc)
        default = d.group(1).strip('"') if d else ZERO.get(typ, "")
        if default == "":
            default = '""'
        flags[name] = {"type": typ, "default": default}
    flags.pop("help", None)
    return flags

# Minimal command lines, valid apart from the missing certificate files.
BASE = {
    "server": ["--uds-name=/nonexistent/konnectivity-server.socket", "--server-port=0",
               "--cluster-cert=/nonexistent/server.crt", "--cluster-key=/nonexistent/server.key"],
    "agent": ["--ca-cert=/nonexistent/ca.crt"],
}
TCP_FRONTEND = ["--uds-name=", "--server-port=8090", "--server-cert=/nonexistent/f.crt",
                "--server-key=/nonexistent/f.key", "--server-ca-cert=/nonexistent/f-ca.crt"]
TOKEN_AUTH = ["--agent-namespace=kube-system", "--agent-service-account=konnectivity-agent",
              "--authentication-audience=system:konnectivity-server"]
# Values that use a flag's feature (several where the answer depends on the value), and extra arguments a
# probe needs; the others get a generic value from their type.
PROBES = {
    "server": {
        "mode": ["http-connect"],
        "proxy-strategies": ["default", "destHost", "defaultRoute", "destHost,default"],
        "tls-min-version": ["VersionTLS12", "VersionTLS13", "VersionTLS11"],
        "cipher-suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
        # The three token-authentication flags only go together.
        "agent-namespace": [TOKEN_AUTH], "agent-service-account": [TOKEN_AUTH],
        "authentication-audience": [TOKEN_AUTH],
        "authentication-cache-ttl": [TOKEN_AUTH + ["--authentication-cache-ttl=0s"]],
        "kubeconfig": ["/nonexistent/kubeconfig"],
        "uds-name": ["/nonexistent/other.socket"], "server-port": ["0"],
        "server-cert": [TCP_FRONTEND], "server-key": [TCP_FRONTEND], "server-ca-cert": [TCP_FRONTEND],
        "server-bind-address": ["127.0.0.1"], "agent-bind-address": ["127.0.0.1"],
        "health-bind-address": ["127.0.0.1"], "admin-bind-address": ["0.0.0.0"],
        "cluster-ca-cert": ["/nonexistent/ca.crt"], "server-id": ["server-a"],
        "cluster-cert": ["/nonexistent/other.crt"], "cluster-key": ["/nonexistent/other.key"],
        "lease-label": ["k8s-app=konnectivity-server"], "lease-namespace": ["kube-system"],
        "enable-contention-profiling": [["--enable-profiling=true", "--enable-contention-profiling=true"]],
    },
    "agent": {
        "enable-contention-profiling": [["--enable-profiling=true", "--enable-contention-profiling=true"]],
        "agent-cert": [["--agent-cert=/nonexistent/a.crt", "--agent-key=/nonexistent/a.key"]],
        "agent-key": [["--agent-cert=/nonexistent/a.crt", "--agent-key=/nonexistent/a.key"]],
        "ca-cert": ["/nonexistent/other-ca.crt"],
        "service-account-token-path": ["/nonexistent/token"], "kubeconfig": ["/nonexistent/kubeconfig"],
        "server-count-source": ["default", "max"], "agent-identifiers": ["host=node-a&ipv4=192.0.2.1"],
        "agent-id": ["agent-a"], "alpn-proto": ["konnectivity"], "health-server-host": ["127.0.0.1"],
        "admin-bind-address": ["0.0.0.0"], "proxy-server-host": ["konnectivity.example.invalid"],
        "lease-label-selector": ["k8s-app=konnectivity-server"],
        "proxy-server-addresses": ["a.example.invalid:8091,[2001:db8::1]:8091"], "drain-timeout": ["50s", "0"],
    },
}
COMMON = {  # klog flags, both binaries
    "log-file": ["/nonexistent/x.log"], "log-dir": ["/nonexistent"], "vmodule": ["server=5"],
    "log-backtrace-at": ["server.go:10"], "stderrthreshold": ["ERROR"], "alsologtostderrthreshold": ["ERROR"],
    "log-file-max-size": ["100"], "v": ["5"],
}
GENERIC = {"duration": "2s", "int": None, "uint": None, "float32": "5", "string": None, "strings": None}

def probe_args(kind, name, ref, ours):
    vals = PROBES[kind].get(name) or COMMON.get(name)
    if vals is None:
        is_bool = (ours and ours.get("bool")) or (ref and ref["type"] == "")
        if is_bool:
            default = (ours or {}).get("default") or (ref or {}).get("default", "false")
            vals = ["false", "true"] if default == "true" else ["true", "false"]
        else:
            typ = (ref or {}).get("type", "string")
            v = GENERIC.get(typ)
            if v is None:
                v = (ours or {}).get("default") or (ref or {}).get("default") or "1"
                v = "" if v == '""' else v
            vals = [v]
    # A probe is a value for --name, or a list of whole arguments.
    return [(None, v) if isinstance(v, list) else (v, [f"--{name}={v}"]) for v in vals]

def classify(binary, kind, args):
    names = {a.split("=", 1)[0] for a in args}
    base = [a for a in BASE[kind] if a.split("=", 1)[0] not in names]
    code, out = run([binary] + base + args)
    lines = [l for l in out.strip().splitlines() if l.strip()]
    why = next((l for l in lines if l.startswith("error:")), lines[-1] if lines else "")
    why = re.sub(r"^proxy-(server|agent): ", "", why)
    if code == 2 and "unexpected argument" in why:
        return "unknown"
    if code == 2 and "not supported yet" in why:
        return "refused"
    if code == 2 and re.search(r'"/nonexistent/[^"]*": no such file$', why):
        return "ok"  # accepted; the probe's file just does not exist here
    if code == 2:
        return "invalid: " + why
    return "ok"

def status(kind, binary, name, ref, ours):
    results = []
    for value, args in probe_args(kind, name, ref, ours):
        results.append((value, classify(binary, kind, args)))
    if all(r == "ok" for _, r in results):
        return "yes"
    if any(r == "unknown" for _, r in results):
        return "**not accepted**"
    if len(results) == 1:
        r = results[0][1]
        return "refused: not supported yet" if r == "refused" else r
    parts = []
    for value, r in results:
        word = {"ok": "yes", "refused": "not supported yet"}.get(r, r)
        parts.append(f"`{value}`: {word}")
    return "; ".join(parts)

def show(v):
    return "(none)" if v is None else f"`{v}`" if v != "" else '`""`'

def table(kind, ours_bin, ref_bin):
    ours, ref = ours_help(ours_bin), ref_help(ref_bin)
    rows = []
    for name in sorted(set(ours) | set(ref)):
        o, r = ours.get(name), ref.get(name)
        if name in ("server-id", "agent-id"):
            rdef, odef = "random UUID", "random UUID"
        else:
            rdef = r["default"] if r else None
            odef = (o["default"] if o and o["default"] is not None else None) if o else None
        if r is None:
            where = "ours only"
        elif o is None:
            where = "hidden in --help"
        else:
            where = ""
        if r and o and odef is not None and odef.strip('"') != rdef.strip('"'):
            default = f"reference {show(rdef)}, ours {show(odef)}"
        else:
            default = show(rdef if r else odef)
        rows.append(f"| `--{name}` | {default} | {status(kind, ours_bin, name, r, o)} | {where} |")
    head = ["| flag | default | accepted by konnectivity-rs | note |", "|---|---|---|---|"]
    return "\n".join(head + rows)

print("#### proxy-server\n")
print(table("server", os.environ["SERVER"], os.environ["REF"] + "/proxy-server"))
print("\n#### proxy-agent\n")
print(table("agent", os.environ["AGENT"], os.environ["REF"] + "/proxy-agent"))
PY
) || die "generating the table"

begin='<!-- flag-table:begin (generated by deploy/flag-table.sh; do not edit by hand) -->'
end='<!-- flag-table:end -->'
case $mode in
  print) echo "$table" ;;
  check|write)
    [[ -f $file ]] || die "no file $file"
    grep -qF "$begin" "$file" && grep -qF "$end" "$file" || die "$file has no flag-table markers"
    new=$(BEGIN="$begin" END="$end" TABLE="$table" python3 -c '
import os, sys
text = open(sys.argv[1]).read()
b, e = os.environ["BEGIN"], os.environ["END"]
head, rest = text.split(b, 1)
_, tail = rest.split(e, 1)
sys.stdout.write(head + b + "\n" + os.environ["TABLE"] + "\n" + e + tail)' "$file")
    if [[ $mode == write ]]; then
      printf '%s' "$new" >"$file"
      echo "flag-table.sh: updated $file"
    elif [[ $new != "$(cat "$file")" ]]; then
      diff <(cat "$file") <(printf '%s' "$new") >&2 || true
      die "$file's flag table is out of date: run deploy/flag-table.sh --write $file"
    else
      echo "flag-table.sh: $file is up to date"
    fi
    ;;
esac
