#!/usr/bin/env bash
# Checks the monitoring bundle offline:
#   1. prometheusrule.yaml: its `spec` (the rule groups) extracted into a plain Prometheus rules file, then
#      `promtool check rules` (PromQL syntax, fields, templates) and `promtool test rules rules-test.yaml`
#      (alerts fire and clear as docs/observability.md says);
#   2. dashboards/*.json: valid JSON (jq), a Grafana dashboard whose panels all query the datasource variable,
#      small enough for a ConfigMap applied client-side (its copy in the last-applied annotation: 256 KiB).
# That every metric and label the rules and the dashboard use is served by the binaries is checked by
# crates/konnectivity-it/tests/it/monitoring.rs, not here.
#
# Needs promtool (Debian: apt-get install prometheus) and jq.
set -euo pipefail

die() { echo "check.sh: FAILED: $*" >&2; exit 1; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"
command -v promtool >/dev/null || die "promtool not found (Debian: apt-get install prometheus)"
command -v jq >/dev/null || die "jq not found"

work=$(mktemp -d /tmp/konnectivity-monitoring-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== 1. rules ($(promtool --version 2>&1 | head -1))"
[[ $(grep -c '^apiVersion: monitoring.coreos.com/v1$' prometheusrule.yaml) == 1 &&
   $(grep -c '^kind: PrometheusRule$' prometheusrule.yaml) == 1 ]] \
  || die "prometheusrule.yaml: expected one monitoring.coreos.com/v1 PrometheusRule"
# `spec:` is the last top-level key; its body, two spaces less indented, is a rules file (`groups:` ...).
awk '
  /^spec:[[:space:]]*$/ { inspec = 1; next }
  inspec && /^[^[:space:]#]/ { print "prometheusrule.yaml: a top-level key after spec: " $0 > "/dev/stderr"; exit 1 }
  inspec { sub(/^  /, ""); print }
' prometheusrule.yaml >"$work/konnectivity.rules.yaml" || die "extracting spec from prometheusrule.yaml"
grep -q '^groups:' "$work/konnectivity.rules.yaml" || die "prometheusrule.yaml: spec has no groups"
promtool check rules "$work/konnectivity.rules.yaml" || die "promtool check rules"
# rules-test.yaml names its rule file relative to itself.
cp rules-test.yaml "$work/"
(cd "$work" && promtool test rules rules-test.yaml) || die "promtool test rules"

echo "== 2. dashboards"
for d in dashboards/*.json; do
  jq empty "$d" || die "$d: not valid JSON"
  size=$(wc -c <"$d")
  ((size < 200 * 1024)) || die "$d: $size bytes, too large for a client-side applied ConfigMap"
  jq -e '.uid and .title and (.templating.list | any(.type == "datasource" and .name == "datasource"))' "$d" \
    >/dev/null || die "$d: needs a uid, a title and a datasource variable named datasource"
  # Every panel and every query use the datasource variable, so the dashboard imports into any Grafana.
  wrong=$(jq -r '[.. | objects | select(has("datasource")) | .datasource
                  | select(type != "object" or .uid != "${datasource}")] | length' "$d")
  [[ $wrong == 0 ]] || die "$d: $wrong datasource references are not \${datasource}"
  panels=$(jq '[.. | objects | select(has("targets")) | .targets[] | select(.expr)] | length' "$d")
  ((panels > 0)) || die "$d: no queries"
  echo "   $d: $panels queries, $size bytes"
done

echo
echo "check.sh: monitoring bundle valid"
