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

  perf stat -e 'raw_syscalls:sys_enter,syscalls:sys_enter_<name>,...' -p GATEWAY_PID

(falls back to `strace -f -c -p PID`, bounded by `timeout`, when syscall
tracepoints are unavailable; strace is installed with apt when missing).
The CPU per request is measured in an untraced window of the same length
just before. Requests completed in each window come from the gateway's /metrics
(ringtunnel_gateway_requests_total before and after). Prints every syscall
with its count per request, frames per writev from /stats, and instructions
(and cycles) per request when the CPU exposes those counters to perf.

With io_uring, socket reads and writes are submitted in rings, not as
read/write/writev syscalls: expect io_uring_enter to dominate and
read/write/writev/sendmsg/recvmsg to be near zero. Under the legacy
(epoll) driver (--driver legacy) they show up one by one.

Options:
  --conns N          concurrency (default 1000)
  --duration D       length of each of the two windows, untraced (CPU per
                     request) then traced (syscalls) (default 10s; the load
                     runs 2 x D + 10 s, + 40 s with --all-syscalls)
  --delay-ms MS      backend delay (default 0)
  --driver D         auto | uring | legacy for the gateway (default auto)
  --cores N          gateway --cores (default: all)
  --all-syscalls     trace every syscalls:sys_enter_* tracepoint instead of
                     the ~30 named ones + the total (slow to attach)
  --strace           use strace even if perf works
  --out DIR          output directory (default results/)
  -h, --help         this text

Writes DIR/perf-stat.txt (and .md).
EOF
}

conns=1000 duration=10s delay=0 driver=auto cores="" force_strace=0 all_syscalls=0 out=""
args=("$@")
while (($#)); do
  case $1 in
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --strace) force_strace=1; shift ;;
    --all-syscalls) all_syscalls=1; shift ;;
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

# The syscalls worth naming, plus the total of all of them. (Every
# syscalls:sys_enter_* tracepoint, --all-syscalls, names everything but
# takes perf several seconds per thread to attach on some VMs.)
named=(io_uring_enter io_uring_register epoll_wait epoll_pwait epoll_ctl read write readv writev
  recvfrom sendto recvmsg sendmsg accept accept4 connect close shutdown futex clock_nanosleep
  nanosleep sched_yield eventfd2 mmap munmap madvise mprotect brk setsockopt getsockopt fcntl ioctl)
if ((all_syscalls)); then
  syscall_events='syscalls:sys_enter_*'
else
  syscall_events=raw_syscalls:sys_enter
  for sc in "${named[@]}"; do
    [[ -d /sys/kernel/tracing/events/syscalls/sys_enter_$sc || -d /sys/kernel/debug/tracing/events/syscalls/sys_enter_$sc ]] &&
      syscall_events+=,syscalls:sys_enter_$sc
  done
fi

hw=()
if [[ $mode == perf ]]; then
  for ev in instructions cycles; do
    # Capture first: `| grep -q` under pipefail races with perf's SIGPIPE.
    probe=$(perf stat -e "$ev" true 2>&1 || true)
    if [[ $probe == *"not supported"* || $probe == *"not counted"* ]]; then
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

snap() { # requests frames writevs cpu_ticks time
  echo "$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_requests_total)" \
    "$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_frames_total)" \
    "$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_uplink_writev_total)" \
    "$(rt_cpu_ticks "$pid")" "$EPOCHREALTIME"
}
wait_file() { # FILE SECS
  local deadline=$((SECONDS + $2))
  until [[ -e $1 ]]; do
    ((SECONDS < deadline)) || rt_die "timed out waiting for the tracer ($1)"
    sleep 0.02
  done
}

# Two windows of D seconds inside one load: the first measures the gateway's
# CPU per request untraced, the second counts syscalls. (Tracing every
# syscall tracepoint makes each context switch of the gateway's threads
# expensive, so CPU measured under perf stat is inflated, most at low c.)
slack=10
((all_syscalls)) && slack=40
bench=(bench "http://$RT_GW_PUBLIC/" --host demo -c "$conns" -d "$((2 * secs + slack))s" --warmup 1s)
timeout --kill-after=5 $((2 * secs + slack + 60)) "${RT_BENCH[@]}" "${bench[@]:1}" >"$RT_TMP/bench.out" &
bench_pid=$!
RT_PIDS+=("$bench_pid")
sleep 1.5

read -r ra0 _ _ ca0 sa0 < <(snap)
sleep "$secs"
read -r ra1 _ _ ca1 sa1 < <(snap)

counts=$RT_TMP/counts.tsv # name \t count
if [[ $mode == perf ]]; then
  # The tracer's workload is a handshake: it marks when counting has
  # begun, sleeps D, marks again and waits for our snapshot, so the
  # request counts cover exactly the counted window (attaching hundreds of
  # tracepoints to every thread can take seconds on a VM).
  events=$syscall_events
  ((${#hw[@]})) && events+=,$(
    IFS=,
    echo "${hw[*]}"
  )
  rt_log "perf stat on $(($(tr -cd , <<<"$events" | wc -c) + 1)) events (syscall tracepoints$( ((${#hw[@]})) && echo ", ${hw[*]}")) -p $pid for ${secs}s"
  perf stat -x, -e "$events" -p "$pid" -o "$RT_TMP/perf-stat.csv" -- \
    bash -c 'touch "$1/t-start"; sleep "$2"; touch "$1/t-end"; n=0
      while [ ! -e "$1/t-ack" ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n + 1)); done' \
    _ "$RT_TMP" "$secs" 2>"$RT_TMP/perf-stat.err" &
  tracer=$!
  RT_PIDS+=("$tracer")
  wait_file "$RT_TMP/t-start" 120
  read -r r0 f0 w0 t0 s0 < <(snap)
  wait_file "$RT_TMP/t-end" $((secs + 30))
  read -r r1 f1 w1 t1 s1 < <(snap)
  touch "$RT_TMP/t-ack"
  wait "$tracer" || { cat "$RT_TMP/perf-stat.err" >&2; rt_die "perf stat failed"; }
  awk -F, '$1 ~ /^[0-9]+$/ && $1 > 0 { n = $3; sub(/^syscalls:sys_enter_/, "", n); sub(/^raw_syscalls:sys_enter$/, "(all syscalls)", n); print n "\t" $1 }' \
    "$RT_TMP/perf-stat.csv" >"$counts"
else
  rt_log "strace -f -c -p $pid for ${secs}s (strace slows the traced process: counts per request stay meaningful, rates do not)"
  read -r r0 f0 w0 t0 s0 < <(snap)
  timeout -s INT "$secs" strace -f -c -p "$pid" -o "$RT_TMP/strace.txt" 2>/dev/null || true
  read -r r1 f1 w1 t1 s1 < <(snap)
  awk '$1 ~ /^[0-9.]+$/ && NF >= 5 { name = $NF; calls = $4; if (name != "total") print name "\t" calls }' \
    "$RT_TMP/strace.txt" >"$counts"
fi
kill -0 "$bench_pid" 2>/dev/null ||
  rt_log "warning: the load ended before the traced window closed: counts include connection teardown"
fpw=$(rt_fpw_summary "$RT_GW_ADMIN")

rc=0
wait "$bench_pid" || rc=$?
((rc == 0)) || rt_log "warning: the load generator exited with $rc"
reqs=$((r1 - r0))
reqs_a=$((ra1 - ra0))
((reqs > 0 && reqs_a > 0)) || rt_die "the gateway completed no requests in a window"
tck=$(rt_clk_tck)

{
  rt_report_head "Gateway syscalls per request (c=$conns, backend delay ${delay} ms, driver $driver, $mode)" \
    "perf/stat.sh ${args[*]}"
  echo "Load (whole run, the counting window is inside it):"
  echo
  echo '```'
  cat "$RT_TMP/bench.out"
  echo '```'
  echo
  echo "Untraced window ($(awk -v a="$sa0" -v b="$sa1" 'BEGIN { printf "%.1f", b - a }') s): $reqs_a requests through the gateway ($(awk -v r="$reqs_a" -v a="$sa0" -v b="$sa1" 'BEGIN { printf "%.0f", r / (b - a) }') req/s),"
  echo "gateway CPU $(awk -v t=$((ca1 - ca0)) -v h="$tck" -v r="$reqs_a" 'BEGIN { printf "%.2f s = %.1f us per request", t / h, t / h / r * 1e6 }') (utime+stime)."
  echo
  echo "Traced window ($(awk -v a="$s0" -v b="$s1" 'BEGIN { printf "%.1f", b - a }') s, $mode): $reqs requests ($(awk -v r="$reqs" -v a="$s0" -v b="$s1" 'BEGIN { printf "%.0f", r / (b - a) }') req/s);"
  echo "gateway CPU $(awk -v t=$((t1 - t0)) -v h="$tck" -v r="$reqs" 'BEGIN { printf "%.2f s = %.1f us per request", t / h, t / h / r * 1e6 }') including the tracing overhead."
  echo
  echo '```'
  printf '%-24s %12s %12s\n' syscall/event count per_request
  # "(all syscalls)" comes from raw_syscalls:sys_enter when traced; else it
  # is the sum of the rows.
  grep -v -e '^instructions' -e '^cycles' "$counts" | sort -t$'\t' -k2,2nr |
    awk -F'\t' -v r="$reqs" '
      $1 == "(all syscalls)" { all = $2; next }
      { printf "%-24s %12d %12.4f\n", $1, $2, $2 / r; t += $2 }
      END {
        if (all == "") all = t
        else if (all > t) printf "%-24s %12d %12.4f\n", "(others)", all - t, (all - t) / r
        printf "%-24s %12d %12.4f\n", "(all syscalls)", all, all / r
      }'
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
