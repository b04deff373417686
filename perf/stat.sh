#!/usr/bin/env bash
# Syscalls per request and frames per writev of the gateway under load.
# See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

usage() {
  cat <<'EOF'
Usage: perf/stat.sh [options]

Starts echo (no delay) + gateway + agent on 127.0.0.1, drives a closed-loop
load through the tunnel, and counts the gateway's system calls for a fixed
window inside the load:

  perf stat -e 'syscalls:sys_enter_*' -p GATEWAY_PID -- sleep D

(falls back to `strace -f -c -p PID`, bounded by `timeout`, when syscall
tracepoints are unavailable; strace is installed with apt when missing).
Requests completed in the same window come from the gateway's /metrics
(ringtunnel_gateway_requests_total before and after). Prints every syscall
with its count per request, frames per writev from /stats, and instructions
(and cycles) per request when the CPU exposes those counters to perf.

With io_uring, socket reads and writes are submitted in rings, not as
read/write/writev syscalls: expect io_uring_enter to dominate and
read/write/writev/sendmsg/recvmsg to be near zero. Under the legacy
(epoll) driver (--driver legacy) they show up one by one.

Options:
  --conns N          concurrency (default 1000)
  --duration D       counting window (default 10s; the load runs 2 s longer)
  --delay-ms MS      backend delay (default 0)
  --driver D         auto | uring | legacy for the gateway (default auto)
  --cores N          gateway --cores (default: all)
  --strace           use strace even if perf works
  --out DIR          output directory (default results/)
  -h, --help         this text

Writes DIR/perf-stat.txt (and .md).
EOF
}

conns=1000 duration=10s delay=0 driver=auto cores="" force_strace=0 out=""
args=("$@")
while (($#)); do
  case $1 in
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --strace) force_strace=1; shift ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init perf-stat
# shellcheck source=perf/tools.sh
source "$RT_ROOT/perf/tools.sh"
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/perf-stat
secs=$(rt_secs "$duration")

mode=perf
if ((force_strace)); then
  mode=strace
else
  if ! command -v perf >/dev/null; then
    rt_apt_install linux-perf || true
  fi
  if ! command -v perf >/dev/null ||
    ! perf stat -e syscalls:sys_enter_io_uring_enter true >/dev/null 2>&1; then
    rt_log "perf syscall tracepoints unavailable: falling back to strace -c"
    mode=strace
  fi
fi
[[ $mode == strace ]] && rt_need_strace

hw=()
if [[ $mode == perf ]]; then
  for ev in instructions cycles; do
    if perf stat -e "$ev" true 2>&1 | grep -q 'not supported'; then
      rt_log "hardware counter '$ev' not supported here (VM?): skipped"
    else
      hw+=("$ev")
    fi
  done
fi

gw_flags=(--driver "$driver")
[[ -n $cores ]] && gw_flags+=(--cores "$cores")
rt_echo echo "$delay"
rt_gateway gateway "${gw_flags[@]}"
rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR"
pid=$RT_GW_PID

bench=(bench "http://$RT_GW_PUBLIC/" --host demo -c "$conns" -d "$((secs + 2))s" --warmup 1s)
timeout --kill-after=5 $((secs + 60)) "${RT_BENCH[@]}" "${bench[@]:1}" >"$RT_TMP/bench.out" &
bench_pid=$!
RT_PIDS+=("$bench_pid")
sleep 1.5

r0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
f0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_frames_total)
w0=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_writev_total)
t0=$(rt_cpu_ticks "$pid")
counts=$RT_TMP/counts.tsv # name \t count
if [[ $mode == perf ]]; then
  events=syscalls:sys_enter_*
  ((${#hw[@]})) && events+=,$(
    IFS=,
    echo "${hw[*]}"
  )
  rt_log "perf stat -e '$events' -p $pid for ${secs}s"
  perf stat -x, -e "$events" -p "$pid" -o "$RT_TMP/perf-stat.csv" -- sleep "$secs" ||
    rt_die "perf stat failed"
  awk -F, '$1 ~ /^[0-9]+$/ && $1 > 0 { n = $3; sub(/^syscalls:sys_enter_/, "", n); print n "\t" $1 }' \
    "$RT_TMP/perf-stat.csv" >"$counts"
else
  rt_log "strace -f -c -p $pid for ${secs}s (strace slows the traced process: counts per request stay meaningful, rates do not)"
  timeout -s INT "$secs" strace -f -c -p "$pid" -o "$RT_TMP/strace.txt" 2>/dev/null || true
  awk '$1 ~ /^[0-9.]+$/ && NF >= 5 { name = $NF; calls = $4; if (name != "total") print name "\t" calls }' \
    "$RT_TMP/strace.txt" >"$counts"
fi
r1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)
f1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_frames_total)
w1=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_writev_total)
t1=$(rt_cpu_ticks "$pid")
fpw=$(rt_fpw_summary "$RT_GW_ADMIN")

rc=0
wait "$bench_pid" || rc=$?
((rc == 0)) || rt_log "warning: the load generator exited with $rc"
reqs=$((r1 - r0))
((reqs > 0)) || rt_die "the gateway completed no requests in the window"
tck=$(rt_clk_tck)

{
  echo "# Gateway syscalls per request (c=$conns, backend delay ${delay} ms, driver $driver, ${secs}s window, $mode)"
  echo
  echo '```'
  rt_rel "perf/stat.sh ${args[*]}"
  echo '```'
  echo
  rt_machine_facts
  echo
  echo "Load (whole run, the counting window is inside it):"
  echo
  echo '```'
  cat "$RT_TMP/bench.out"
  echo '```'
  echo
  echo "Window: $reqs requests through the gateway ($(awk -v r="$reqs" -v s="$secs" 'BEGIN { printf "%.0f", r / s }') req/s),"
  echo "gateway CPU $(awk -v t=$((t1 - t0)) -v h="$tck" -v r="$reqs" 'BEGIN { printf "%.2f s = %.1f us per request", t / h, t / h / r * 1e6 }')."
  echo
  echo '```'
  printf '%-24s %12s %12s\n' syscall/event count per_request
  grep -v -e '^instructions' -e '^cycles' "$counts" | sort -t$'\t' -k2,2nr |
    awk -F'\t' -v r="$reqs" '{ printf "%-24s %12d %12.4f\n", $1, $2, $2 / r; t += $2 }
      END { printf "%-24s %12d %12.4f\n", "(all syscalls)", t, t / r }'
  if [[ $mode == perf ]]; then
    for ev in "${hw[@]}"; do
      awk -F, -v e="$ev" -v r="$reqs" '$3 == e && $1 ~ /^[0-9]+$/ { printf "%-24s %12d %12.1f\n", e, $1, $1 / r }' "$RT_TMP/perf-stat.csv"
    done
    ((${#hw[@]})) || echo "(instructions/cycles: not supported by perf on this machine)"
  fi
  echo '```'
  echo
  echo "Uplink writes in the window: $((f1 - f0)) frames in $((w1 - w0)) writev calls" \
    "($(awk -v f=$((f1 - f0)) -v w=$((w1 - w0)) 'BEGIN { if (w) printf "%.2f", f / w; else print "n/a" }') frames per writev);" \
    "$(awk -v w=$((w1 - w0)) -v r="$reqs" 'BEGIN { printf "%.3f", w / r }') writev per request."
  echo
  echo "Frames per writev per core (gateway /stats, whole run):"
  echo
  echo '```'
  echo "$fpw"
  echo '```'
} >"$base.md"
cp "$base.md" "$base.txt"
cat "$base.md"
rt_log "wrote $base.md"
