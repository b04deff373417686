#!/usr/bin/env bash
# What do the request rates cost a request? Two stacks side by side, the
# same load on both, alternating. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/rate-cost.sh [options]

Two gateways in front of one echo backend, one agent each:
  A: no rate limits
  B: --session-rate and --rate-per-ip set so high that nothing is refused:
     every request pays the session cell's compare-and-swap and the client
     IP's (cached per core) lookup and compare-and-swap
`ringtunnel bench A --compare B` runs both with the same open-loop load,
alternating, with keep-alive and with a new connection per request.

Per mode it prints p50/p99 and the gateway's CPU microseconds per request
(utime + stime from /proc over the run, divided by the requests the
gateway counted), for A and B.

Options:
  --rate RPS         open-loop rate with keep-alive (default 5000)
  --close-rate RPS   open-loop rate without keep-alive (default 1000)
  --conns N          connection pool (default 100)
  --duration D       measured time per run (default 10s)
  --out DIR          output directory (default results/)
  -h, --help         this text

Writes DIR/rate-cost.md, .txt and one .json per mode.
EOF
}

rate=5000 close_rate=1000 conns=100 duration=10s out=""
args=("$@")
while (($#)); do
  case $1 in
    --rate) rt_need_arg "$@"; rate=$2; shift 2 ;;
    --close-rate) rt_need_arg "$@"; close_rate=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init rate-cost
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/rate-cost
bound=$((2 * ($(rt_secs "$duration") + 1 + 12) + 60))
tck=$(rt_clk_tck)

rt_echo echo 0
rt_gateway gw-a --cores 2
a_public=$RT_GW_PUBLIC a_admin=$RT_GW_ADMIN a_pid=$RT_GW_PID
rt_agent agent-a "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR"
rt_gateway gw-b --cores 2 --session-rate 1000000000/s --rate-per-ip 1000000000/s
b_public=$RT_GW_PUBLIC b_admin=$RT_GW_ADMIN b_pid=$RT_GW_PID
rt_agent agent-b "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR"

: >"$base.txt"
report=""
for mode in keepalive close; do
  ra0=$(rt_metric_sum "$a_admin" ringtunnel_gateway_requests_total)
  rb0=$(rt_metric_sum "$b_admin" ringtunnel_gateway_requests_total)
  ca0=$(rt_cpu_ticks "$a_pid") cb0=$(rt_cpu_ticks "$b_pid")
  rt_ab_bench "$mode" "A = no rates, B = session + per-IP rates" "$a_public" "$b_public"
  r=$AB_RATE json=$AB_JSON
  ca1=$(rt_cpu_ticks "$a_pid") cb1=$(rt_cpu_ticks "$b_pid")
  ra1=$(rt_metric_sum "$a_admin" ringtunnel_gateway_requests_total)
  rb1=$(rt_metric_sum "$b_admin" ringtunnel_gateway_requests_total)
  limited=$(rt_metric_sum "$b_admin" ringtunnel_rate_limited_total)

  IFS=$'\t' read -r _ _ _ a50 _ a99 _ _ aerr _ < <(rt_json_rows "$json" rows)
  IFS=$'\t' read -r _ _ _ b50 _ b99 _ _ berr _ < <(rt_json_rows "$json" compare)
  report+=$(awk -v m="$mode" -v r="$r" -v a50="$a50" -v a99="$a99" -v b50="$b50" -v b99="$b99" \
    -v ca=$((ca1 - ca0)) -v cb=$((cb1 - cb0)) -v ra=$((ra1 - ra0)) -v rb=$((rb1 - rb0)) \
    -v t="$tck" -v ae="$aerr" -v be="$berr" -v lim="$limited" 'BEGIN {
      ua = ra > 0 ? ca / t * 1e6 / ra : 0
      ub = rb > 0 ? cb / t * 1e6 / rb : 0
      printf "%-10s %7d %9.3f %9.3f %9.3f %9.3f %10.1f %10.1f %8.2f %d/%d %d\n", m, r, a50, b50, a99, b99, ua, ub, (ua > 0 ? ub / ua : 0), ae, be, lim }')
  report+=$'\n'
done

header=$(printf '%-10s %7s %9s %9s %9s %9s %10s %10s %8s %s %s' mode rate A_p50 B_p50 A_p99 B_p99 A_us/req B_us/req B/A "errors A/B" "429s B")
{
  rt_report_head "Rate limit cost: gateway --cores 2 without rates (A) vs with --session-rate and --rate-per-ip (B)" \
    "scripts/rate-cost.sh ${args[*]}"
  echo '```'
  echo "$header"
  printf '%s' "$report"
  echo '```'
  echo
  echo "Latencies in ms. us/req: gateway CPU (user + system) per request it served,"
  echo "warmup included in both numerator and denominator. One run on a shared"
  echo "machine: compare A and B within a row only."
  echo
  echo "Raw tables: $(basename "$base").txt"
} >"$base.md"

echo
echo "$header"
printf '%s' "$report"
rt_log "wrote $base.md"
