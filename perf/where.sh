#!/usr/bin/env bash
# Where a request's time goes, per process (gateway and agent): user vs
# kernel CPU, io_uring_enter and other syscalls, context switches and heap
# allocations per request, and the top functions. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

usage() {
  cat <<'EOF'
Usage: perf/where.sh [options]

Starts echo + gateway + agent on 127.0.0.1 and loads the tunnel with wrk
(-t1) twice for --duration each:

 1. counted run: `perf stat -p PID` on the gateway and on the agent at
    once, counting raw_syscalls:sys_enter, syscalls:sys_enter_io_uring_enter,
    context-switches and uprobes on the allocator's entry points
    (mi_malloc_aligned, mi_zalloc_aligned, mi_realloc_aligned: every Rust
    heap allocation goes through one of them under mimalloc), plus
    utime/stime of each process from /proc. Everything is divided by the
    requests wrk completed. The uprobes slow the processes down, so the
    CPU figures of this run are inflated; the counts are not.
 2. sampled run: `perf record -F 999` (no call graph) on both processes,
    then the top --top symbols of each (`perf report --sort sym`, self time).

Options:
  --mode M        ka (keep-alive) | close (Connection: close) (default ka)
  --conns N       wrk connections (default 100)
  --duration D    length of each run (default 5s)
  --delay-ms MS   backend delay (default 0)
  --driver D      auto | uring | legacy for gateway and agent (default auto)
  --top N         symbols listed per process (default 15)
  --no-record     skip the sampled run
  -h, --help      this text

RINGTUNNEL_BIN picks the binary (see scripts/lib.sh). Needs perf (root).
EOF
}

mode=ka conns=100 duration=5s delay=0 driver=auto top=15 record=1
while (($#)); do
  case $1 in
    --mode) rt_need_arg "$@"; mode=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --top) rt_need_arg "$@"; top=$2; shift 2 ;;
    --no-record) record=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $mode in ka | close) ;; *) echo "--mode must be ka or close" >&2; exit 2 ;; esac

rt_init perf-where
# shellcheck source=perf/tools.sh
source "$RT_ROOT/perf/tools.sh"
rt_need_perf
command -v wrk >/dev/null || rt_apt_install wrk || rt_die "wrk is required (apt package wrk)"
rt_bin
secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)

rt_echo echo "$delay"
rt_gateway gateway --driver "$driver"
rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" --driver "$driver"
url="http://$RT_GW_PUBLIC/"
hdr=(-H "Host: demo")
[[ $mode == close ]] && hdr+=(-H "Connection: close")

# Allocation counters: uprobes on the binary's allocator entry points.
probes=()
for fn in mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned; do
  perf probe -q -d "probe_rtw:$fn" >/dev/null 2>&1 || true
  if perf probe -q -x "$RT_BIN" --add "probe_rtw:$fn=$fn" >/dev/null 2>&1; then
    probes+=("probe_rtw:$fn")
  else
    rt_log "no uprobe on $fn (symbol missing?): allocations not counted through it"
  fi
done
cleanup_probes() { for p in "${probes[@]}"; do perf probe -q -d "$p" >/dev/null 2>&1 || true; done; }
events=raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,context-switches
for p in "${probes[@]}"; do events+=",$p"; done

rt_run_bounded $((secs + 30)) "$RT_TMP/warm.txt" wrk -t1 -c "$conns" -d 1s "${hdr[@]}" "$url" || true

declare -A t0
waitfor=()
for r in gateway agent; do
  pid_var=RT_GW_PID
  [[ $r == agent ]] && pid_var=RT_AGENT_PID
  stat=$(<"/proc/${!pid_var}/stat")
  read -r -a f <<<"${stat##*) }"
  t0[$r]="${f[11]} ${f[12]}"
  perf stat -x, -e "$events" -p "${!pid_var}" -o "$RT_TMP/stat-$r.csv" -- sleep $((secs + 1)) &
  RT_PIDS+=("$!")
  waitfor+=("$!")
done
sleep 0.3
rt_run_bounded $((secs + 30)) "$RT_TMP/count.txt" wrk -t1 -c "$conns" -d "$duration" --latency "${hdr[@]}" "$url" || true
declare -A t1
for r in gateway agent; do
  pid_var=RT_GW_PID
  [[ $r == agent ]] && pid_var=RT_AGENT_PID
  stat=$(<"/proc/${!pid_var}/stat")
  read -r -a f <<<"${stat##*) }"
  t1[$r]="${f[11]} ${f[12]}"
done
wait "${waitfor[@]}"
cleanup_probes
read -r req rps _ _ <<<"$(rt_wrk_stats "$RT_TMP/count.txt")"
[[ -n ${req:-} && $req -gt 0 ]] || rt_die "wrk completed no request (see $RT_TMP)"

echo "# perf/where.sh --mode $mode --conns $conns --duration $duration --delay-ms $delay --driver $driver"
echo "counted run: $req requests, $rps req/s (slowed by the uprobes)"
printf '%-8s %9s %9s %12s %12s %10s %10s\n' process "user-us" "sys-us" "syscalls" io_uring_enter "ctx-sw" allocs
for r in gateway agent; do
  read -r u0 s0 <<<"${t0[$r]}"
  read -r u1 s1 <<<"${t1[$r]}"
  awk -F, -v r="$r" -v req="$req" -v tck="$tck" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) '
    $3 ~ /raw_syscalls:sys_enter/ { sc = $1 } $3 ~ /io_uring_enter/ { ue = $1 }
    $3 ~ /context-switches/ { cs = $1 } $3 ~ /probe_rtw/ { al += $1 }
    END { printf "%-8s %9.1f %9.1f %12.2f %12.2f %10.2f %10.2f\n", r,
      du * 1e6 / tck / req, ds * 1e6 / tck / req, sc / req, ue / req, cs / req, al / req }' \
    "$RT_TMP/stat-$r.csv"
done
echo "(per request; user/sys CPU of the counted run includes the uprobe overhead)"

((record)) || exit 0
waitfor=()
for r in gateway agent; do
  pid_var=RT_GW_PID
  [[ $r == agent ]] && pid_var=RT_AGENT_PID
  perf record -q -e cpu-clock -F 999 -p "${!pid_var}" -o "$RT_TMP/$r.data" -- sleep "$secs" 2>/dev/null &
  RT_PIDS+=("$!")
  waitfor+=("$!")
done
sleep 0.3
rt_run_bounded $((secs + 30)) "$RT_TMP/rec.txt" wrk -t1 -c "$conns" -d "$duration" "${hdr[@]}" "$url" || true
wait "${waitfor[@]}"
for r in gateway agent; do
  echo
  echo "## $r: top $top symbols (self, cpu-clock samples)"
  perf report -i "$RT_TMP/$r.data" --stdio --no-children --sort sym 2>/dev/null |
    grep -E '^ +[0-9.]+%' | head -n "$top" || true
done
