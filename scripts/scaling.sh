#!/usr/bin/env bash
# Does the gateway scale with cores, what does a request cost it in CPU,
# and how many connections are handed between cores? See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/scaling.sh [options]

Fast backend (echo, no delay), closed loop with CONNS connections through
the tunnel. One fresh gateway + agent per case:

  gateway --cores 1, agent --uplinks 1
  gateway --cores 2, agent --uplinks 2   (uplinks = cores: no handoff expected)
  gateway --cores 2, agent --uplinks 1   (half the connections must hand off)

(with --max-cores M > 2: every core count 1..M, uplinks = cores and 1.)

Per case: requests/s (bench), gateway CPU seconds per 100k requests
(utime+stime of the gateway PID from /proc/PID/stat, before and after the
run, CLK_TCK from getconf), handoffs and handoffs / requests from /metrics
(a handoff moves a *connection*: with keep-alive it is paid once per
connection, with --no-keepalive once per request).

Options:
  --conns N          concurrency (default 1000)
  --duration D       measured time per case (default 10s)
  --warmup D         (default 1s)
  --max-cores M      largest gateway core count (default 2)
  --no-keepalive     a new connection per request
  --out DIR          output directory (default results/)
  -h, --help         this text

Note: on a machine with few cores the load generator, echo and agent
compete with the gateway for the same cores; read the CPU per request
column before the RPS column.
EOF
}

conns=1000 duration=10s warmup=1s max_cores=2 keepalive=1 out=""
args=("$@")
while (($#)); do
  case $1 in
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --warmup) rt_need_arg "$@"; warmup=$2; shift 2 ;;
    --max-cores) rt_need_arg "$@"; max_cores=$2; shift 2 ;;
    --no-keepalive) keepalive=0; shift ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init scaling
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/scaling
tck=$(rt_clk_tck)
bound=$(($(rt_secs "$duration") + $(rt_secs "$warmup") + 60))

rt_echo echo 0

cases=()
for ((c = 1; c <= max_cores; c++)); do
  cases+=("$c:$c")
  ((c > 1)) && cases+=("$c:1")
done

table=$(printf '%-22s %10s %10s %9s %9s %14s %9s %12s %10s %7s\n' case requests RPS p50_ms p99_ms "gw_cpu_s/100k" handoffs "handoff/req" "handoff/c" errors)
: >"$base.txt"
for cs in "${cases[@]}"; do
  gcores=${cs%%:*} uplinks=${cs##*:}
  label="cores=$gcores uplinks=$uplinks"
  rt_gateway "gw-$gcores-$uplinks" --cores "$gcores"
  gw_pid=$RT_GW_PID
  rt_agent "agent-$gcores-$uplinks" "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" --uplinks "$uplinks"
  agent_pid=$RT_AGENT_PID

  bench=(bench "http://$RT_GW_PUBLIC/" --host demo -c "$conns" -d "$duration"
    --warmup "$warmup" --json "$base-$gcores-$uplinks.json")
  ((keepalive)) || bench+=(--no-keepalive)
  # CPU and counters cover warmup + measurement; RPS and latency only the
  # measurement. The per-request CPU divides the gateway's CPU by the
  # requests the gateway counted over the same window.
  t0=$(rt_cpu_ticks "$gw_pid")
  r0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
  h0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_handoffs_total)
  rt_log "$label: ringtunnel ${bench[*]}"
  rc=0
  rt_run_bounded "$bound" "$RT_TMP/bench.out" "${RT_BENCH[@]}" "${bench[@]:1}" || rc=$?
  { echo "## $label"; cat "$RT_TMP/bench.out"; echo; } >>"$base.txt"
  ((rc == 0)) || rt_die "bench failed for $label (exit $rc)"
  t1=$(rt_cpu_ticks "$gw_pid")
  r1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
  h1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_handoffs_total)

  IFS=$'\t' read -r _ reqs rps p50 _ p99 _ _ errs < <(rt_json_rows "$base-$gcores-$uplinks.json" rows)
  line=$(awk -v l="$label" -v n="$reqs" -v rps="$rps" -v p50="$p50" -v p99="$p99" \
    -v t=$((t1 - t0)) -v hz="$tck" -v gr=$((r1 - r0)) -v h=$((h1 - h0)) -v e="$errs" -v c="$conns" 'BEGIN {
      cpu = gr > 0 ? t / hz / gr * 100000 : 0
      frac = gr > 0 ? h / gr : 0
      printf "%-22s %10d %10.1f %9.2f %9.2f %14.2f %9d %12.4f %10.3f %7d\n", l, n, rps, p50, p99, cpu, h, frac, h / c, e }')
  table+=$'\n'$line
  echo "$line"

  rt_stop "$agent_pid"
  rt_stop "$gw_pid"
done

{
  rt_report_head "Gateway scaling: fast backend, c=$conns$( ((keepalive)) || echo ', no keep-alive')" \
    "scripts/scaling.sh ${args[*]}"
  rt_fenced <<<"$table"
  echo "gw_cpu_s/100k: gateway utime+stime per 100k gateway requests (warmup included)."
  echo "handoff/req: handoffs_total / requests_total; a handoff moves a connection."
  echo "handoff/c: handoffs per client connection (c=$conns; with keep-alive each connection is handed off at most once)."
  echo "Raw bench output: $(basename "$base").txt"
} >"$base.md"

echo
echo "$table"
rt_log "wrote $base.md"
