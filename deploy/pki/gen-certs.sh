#!/usr/bin/env bash
# Creates the certificates a konnectivity-rs deployment needs, with openssl, for a test cluster or as a worked
# example of the profiles docs/deployment.md describes (use your own PKI or cert-manager in production).
#
#   deploy/pki/gen-certs.sh OUT_DIR AGENT_SIDE_NAME... [--frontend FRONTEND_NAME...]
#
# AGENT_SIDE_NAME: every DNS name or IP address agents use as --proxy-server-host (the agent checks the server
# certificate against it), e.g. konnectivity.example.com 203.0.113.10 konnectivity-server.kube-system.svc.
# --frontend: also create the HTTPConnect/TCP-mTLS frontend certificates; FRONTEND_NAME are the names or IPs in
# the egress selector's url (default 127.0.0.1).
#
# Writes, in OUT_DIR (keys are 0600, EC P-256, PKCS#8):
#   ca.crt ca.key                 agent-link CA: signs the agent-port server certificate and the agent client certs
#   server.crt server.key         --cluster-cert/--cluster-key: serverAuth, SANs = AGENT_SIDE_NAMEs
#   agent.crt agent.key           --agent-cert/--agent-key: clientAuth, CN system:konnectivity-agent
#   with --frontend:
#   frontend-ca.crt frontend-ca.key   a SEPARATE CA for kube-apiserver's client certificate (--server-ca-cert)
#   frontend.crt frontend.key         --server-cert/--server-key: serverAuth, SANs = FRONTEND_NAMEs
#   apiserver-client.crt .key         egress selector tlsConfig.clientCert/clientKey: clientAuth
set -euo pipefail

die() { echo "gen-certs.sh: $*" >&2; exit 1; }
[[ $# -ge 2 ]] || die "usage: $0 OUT_DIR AGENT_SIDE_NAME... [--frontend FRONTEND_NAME...]"
command -v openssl >/dev/null || die "openssl not found"

out=$1; shift
agent_side=() frontend=() want_frontend=0
for a in "$@"; do
  if [[ $a == --frontend ]]; then want_frontend=1; continue; fi
  if [[ $want_frontend == 1 ]]; then frontend+=("$a"); else agent_side+=("$a"); fi
done
[[ ${#agent_side[@]} -gt 0 ]] || die "give at least one name or IP that agents dial"
[[ $want_frontend == 0 || ${#frontend[@]} -gt 0 ]] || frontend=(127.0.0.1)

mkdir -p "$out"
umask 077
days=${CERT_DAYS:-365}

san_list() { # NAME... -> "DNS:a,IP:1.2.3.4"
  local s="" n
  for n in "$@"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then s+="${s:+,}IP:$n"; else s+="${s:+,}DNS:$n"; fi
  done
  echo "$s"
}

new_ca() { # NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -keyout "$out/$1.key" -out "$out/$1.crt" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

new_leaf() { # NAME CA CN EKU [SANS]
  local name=$1 ca=$2 cn=$3 eku=$4 sans=${5:-} ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    [[ -z $sans ]] || echo "subjectAltName=$sans"
  } >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$out/$name.key" \
    -out "$out/$name.csr" -subj "/CN=$cn" 2>/dev/null
  openssl x509 -req -in "$out/$name.csr" -CA "$out/$ca.crt" -CAkey "$out/$ca.key" -CAcreateserial \
    -days "$days" -extfile "$ext" -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$ext"
}

new_ca ca konnectivity-agent-link-ca
new_leaf server ca konnectivity-server serverAuth "$(san_list "${agent_side[@]}")"
new_leaf agent ca system:konnectivity-agent clientAuth
if [[ $want_frontend == 1 ]]; then
  new_ca frontend-ca konnectivity-frontend-ca
  new_leaf frontend frontend-ca konnectivity-server-frontend serverAuth "$(san_list "${frontend[@]}")"
  new_leaf apiserver-client frontend-ca system:kube-apiserver-konnectivity-client clientAuth
fi
rm -f "$out"/*.srl
chmod 0644 "$out"/*.crt
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" "$out/agent.crt" >/dev/null || die "verification failed"
echo "wrote $(cd "$out" && ls | tr '\n' ' ')to $out"
echo "server certificate names: $(san_list "${agent_side[@]}")"
