#!/usr/bin/env bash
# Closed-loop concurrency sweep through the tunnel, compared row by row with
# the same load sent straight to the backend. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/sweep.sh [options]

Starts echo (with a delay) + gateway + agent on 127.0.0.1, then runs ONE
`ringtunnel bench` over the gateway with --sweep and --compare against the
echo backend directly, so every row is also a ratio tunnel/direct.

Options:
  --delay-ms MS      backend delay per response (default 35; 0 = throughput ceiling)
  --duration D       measured time per row and target (default 10s)
  --warmup D         unmeasured load before each run (default 1s)
  --sweep LIST       concurrencies (default 1,10,50,100,1000)
  --cores N          --cores for echo, gateway and agent (default: all)
  --bench-cores N    --cores for the load generator (default: all)
  --driver D         auto|uring|legacy for every role (default auto)
  --out DIR          output directory (default results/ in the repo)
  -h, --help         this text

Writes DIR/sweep-<delay>ms.md (command, machine facts, table, frames per
writev), .json and .svg (from bench), and .txt (raw bench output).
Every load is bounded: the bench runs under `timeout`.
EOF
}

delay=35 duration=10s warmup=1s sweep=1,10,50,100,1000 cores="" bench_cores=""
driver=auto out=""
args=("$@")
while (($#)); do
  case $1 in
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --warmup) rt_need_arg "$@"; warmup=$2; shift 2 ;;
    --sweep) rt_need_arg "$@"; sweep=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --bench-cores) rt_need_arg "$@"; bench_cores=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init sweep
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/sweep-${delay}ms

role_flags=(--driver "$driver")
[[ -n $cores ]] && role_flags+=(--cores "$cores")

rt_echo echo "$delay" "${role_flags[@]}"
rt_gateway gateway "${role_flags[@]}"
rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" "${role_flags[@]}"
rt_log "echo=$RT_ECHO_ADDR gateway=$RT_GW_PUBLIC admin=$RT_GW_ADMIN"

bench=(bench "http://$RT_GW_PUBLIC/" --host demo --sweep "$sweep"
  -d "$duration" --warmup "$warmup" --compare "http://$RT_ECHO_ADDR/"
  --json "$base.json" --svg "$base.svg" --driver "$driver")
[[ -n $bench_cores ]] && bench+=(--cores "$bench_cores")
# Newer binaries report the gateway writer's frames per writev per row.
bench_help=$("$RT_BIN" bench --help 2>/dev/null || true)
if [[ $bench_help == *--admin* ]]; then
  bench+=(--admin "$RT_GW_ADMIN")
fi

rows=$(rt_count_list "$sweep")
per_run=$(($(rt_secs "$duration") + $(rt_secs "$warmup")))
bound=$((rows * 2 * (per_run + 12) + 60))

gw_ticks0=$(rt_cpu_ticks "$RT_GW_PID")
req0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
rt_log "running: ringtunnel ${bench[*]} (bounded to ${bound}s)"
rc=0
rt_run_bounded "$bound" "$base.txt" "${RT_BENCH[@]}" "${bench[@]:1}" || rc=$?
cat "$base.txt"
((rc == 0)) || rt_die "bench failed (exit $rc); partial output in $base.txt"

gw_ticks1=$(rt_cpu_ticks "$RT_GW_PID")
req1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
handoffs=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_handoffs_total)
frames=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_frames_total)
writevs=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_writev_total)
gw_errors=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_errors_total)
fpw=$(rt_fpw_summary "$RT_GW_ADMIN")
tck=$(rt_clk_tck)
reqs=$((req1 - req0))
cpu_s=$(awk -v t=$((gw_ticks1 - gw_ticks0)) -v h="$tck" 'BEGIN { printf "%.2f", t / h }')

{
  echo "# Sweep: backend delay ${delay} ms, tunnel vs direct"
  echo
  echo "Command:"
  echo
  echo '```'
  rt_rel "scripts/sweep.sh ${args[*]}"
  echo "# which ran (addresses are ephemeral loopback ports):"
  rt_rel "ringtunnel ${bench[*]}"
  echo '```'
  echo
  echo "Machine:"
  echo
  rt_machine_facts
  echo "- roles: echo, gateway, agent and bench all on this machine (loopback)"
  echo
  echo "Table (A = tunnel via gateway, B = echo backend directly):"
  echo
  echo '```'
  cat "$base.txt"
  echo '```'
  echo
  echo "Gateway during the run (all rows, warmups included):"
  echo
  echo "- requests: $reqs; handoffs: $handoffs; gateway error counters total: $gw_errors"
  echo "- gateway CPU: ${cpu_s} s (utime+stime)"
  echo "- uplink frames: $frames in $writevs writev calls (mean $(awk -v f="$frames" -v w="$writevs" 'BEGIN { if (w) printf "%.2f", f / w; else print "n/a" }') frames per writev)"
  echo
  echo '```'
  echo "$fpw"
  echo '```'
  echo
  echo "Files: $(basename "$base").json, $(basename "$base").svg, $(basename "$base").txt"
} >"$base.md"

echo
echo "frames per writev (gateway /stats, whole run):"
echo "$fpw"
rt_log "wrote $base.md, $base.json, $base.svg, $base.txt"
