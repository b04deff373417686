#!/usr/bin/env bash
# What does a cross-core handoff cost a request? Two stacks side by side,
# the same load on both, alternating. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/handoff-cost.sh [options]

Two gateways with --cores 2 in front of one echo backend:
  A: agent --uplinks 1  -> connections accepted on the core without the
                           uplink are handed to the other core (about half)
  B: agent --uplinks 2  -> every core has an uplink: no handoff
`ringtunnel bench A --compare B` runs both with the same open-loop load,
alternating, twice:
  keep-alive     a connection is handed off once, then served by the other
                 core: shows the cost of the imbalance (one core serves all)
  no keep-alive  every request arrives on a new connection, so about half
                 the requests pay the handoff itself

A handed-off request's extra latency is estimated from the means:
  (mean_A - mean_B) / (fraction of A's requests that were handed off).

Options:
  --rate RPS         open-loop rate with keep-alive (default 5000)
  --close-rate RPS   open-loop rate without keep-alive (default 1000)
  --conns N          connection pool (default 200)
  --duration D       measured time per run (default 10s)
  --delay-ms MS      backend delay (default 0)
  --out DIR          output directory (default results/)
  -h, --help         this text

Writes DIR/handoff-cost.md, .txt and one .json per mode.
EOF
}

rate=5000 close_rate=1000 conns=200 duration=10s delay=0 out=""
args=("$@")
while (($#)); do
  case $1 in
    --rate) rt_need_arg "$@"; rate=$2; shift 2 ;;
    --close-rate) rt_need_arg "$@"; close_rate=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init handoff-cost
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/handoff-cost
bound=$((2 * ($(rt_secs "$duration") + 1 + 12) + 60))

rt_echo echo "$delay"
rt_gateway gw-a --cores 2
a_public=$RT_GW_PUBLIC a_admin=$RT_GW_ADMIN
rt_agent agent-a "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" --uplinks 1
rt_gateway gw-b --cores 2
b_public=$RT_GW_PUBLIC b_admin=$RT_GW_ADMIN
rt_agent agent-b "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" --uplinks 2

: >"$base.txt"
report=""
for mode in keepalive close; do
  ra0=$(rt_metric_sum "$a_admin" ringtunnel_gateway_requests_total)
  ha0=$(rt_metric_sum "$a_admin" ringtunnel_gateway_handoffs_total)
  hb0=$(rt_metric_sum "$b_admin" ringtunnel_gateway_handoffs_total)
  rt_ab_bench "$mode" "A = uplinks 1, B = uplinks 2" "$a_public" "$b_public"
  r=$AB_RATE json=$AB_JSON
  ra1=$(rt_metric_sum "$a_admin" ringtunnel_gateway_requests_total)
  ha1=$(rt_metric_sum "$a_admin" ringtunnel_gateway_handoffs_total)
  hb1=$(rt_metric_sum "$b_admin" ringtunnel_gateway_handoffs_total)

  IFS=$'\t' read -r _ _ _ a50 _ a99 _ _ aerr amean < <(rt_json_rows "$json" rows)
  IFS=$'\t' read -r _ _ _ b50 _ b99 _ _ berr bmean < <(rt_json_rows "$json" compare)
  report+=$(awk -v m="$mode" -v r="$r" -v a50="$a50" -v a99="$a99" -v am="$amean" \
    -v b50="$b50" -v b99="$b99" -v bm="$bmean" -v ha=$((ha1 - ha0)) -v hb=$((hb1 - hb0)) \
    -v ra=$((ra1 - ra0)) -v ae="$aerr" -v be="$berr" 'BEGIN {
      frac = ra > 0 ? ha / ra : 0
      printf "%-10s %7d %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %+9.3f %+9.3f %9.4f", m, r, a50, b50, a99, b99, am, bm, a50 - b50, a99 - b99, frac
      if (frac > 0.01) printf " %+14.3f", (am - bm) / frac; else printf " %14s", "n/a"
      printf " %5d/%-5d %d/%d\n", ha, hb, ae, be }')
  report+=$'\n'
done

header=$(printf '%-10s %7s %9s %9s %9s %9s %9s %9s %9s %9s %9s %14s %11s %s' mode rate A_p50 B_p50 A_p99 B_p99 A_mean B_mean d_p50 d_p99 A_hoff/req est_ms/hoff "hoffs A/B" "errors A/B")
{
  rt_report_head "Handoff cost: gateway --cores 2, agent --uplinks 1 (A) vs --uplinks 2 (B)" \
    "scripts/handoff-cost.sh ${args[*]}"
  echo '```'
  echo "$header"
  printf '%s' "$report"
  echo '```'
  echo
  echo "Latencies in ms. d_* = A - B. A_hoff/req: handoffs / requests on gateway A"
  echo "(warmup included). est_ms/hoff: (A_mean - B_mean) / A_hoff/req, the extra"
  echo "latency of one handed-off request, shown where handoffs are >1% of requests."
  echo
  echo "Raw tables: $(basename "$base").txt"
} >"$base.md"

echo
echo "$header"
printf '%s' "$report"
rt_log "wrote $base.md"
