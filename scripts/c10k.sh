#!/usr/bin/env bash
# Many concurrent streams on one session, and what an idle tunnel costs:
# the two default-sizing checks of issue 9. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF2'
Usage: scripts/c10k.sh [options]

Starts echo (35 ms delay by default), a gateway and an agent on 127.0.0.1
with their DEFAULT limits, then:

1. idle: counts the context switches (wake-ups) of every thread of the
   gateway and of the agent over --idle seconds with no traffic;
2. load: `ringtunnel bench -c C` through the tunnel and straight to the
   backend, alternating, --runs times: requests, errors (5xx and others),
   p50 and p99, and the gateway's peak RSS (VmHWM) after the tunnel runs.

Options:
  --conns C        concurrency (default 10000; needs ~2.2*C file
                   descriptors across the processes: ulimit -n)
  --delay-ms MS    backend delay (default 35)
  --duration D     measured time per run (default 10s)
  --runs N         runs of each (default 1)
  --idle S         idle measurement in seconds (default 10)
  --out DIR        output directory (default results/)
  -h, --help       this text
EOF2
}

conns=10000 delay=35 duration=10s runs=1 idle=10 out=""
while (($#)); do
  case $1 in
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --idle) rt_need_arg "$@"; idle=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init c10k
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/c10k.md
secs=$(rt_secs "$duration")

rt_echo echo "$delay"
rt_gateway gw
gw_pid=$RT_GW_PID public=$RT_GW_PUBLIC
rt_agent agent "$RT_GW_TUNNEL" bench "$RT_ECHO_ADDR"
ag_pid=$RT_AGENT_PID

# Sum of voluntary + involuntary context switches of all threads of PID.
wakeups() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/ctxt_switches:/ { s += $2 } END { print s + 0 }'
}
sleep 1
g0=$(wakeups "$gw_pid") a0=$(wakeups "$ag_pid")
sleep "$idle"
g1=$(wakeups "$gw_pid") a1=$(wakeups "$ag_pid")
idle_line=$(awk -v g=$((g1 - g0)) -v a=$((a1 - a0)) -v s="$idle" \
  'BEGIN { printf "idle %ss: gateway %d wake-ups (%.1f/s), agent %d (%.1f/s)", s, g, g / s, a, a / s }')
rt_log "$idle_line"

rows=$RT_TMP/rows.txt
: >"$rows"
for ((r = 1; r <= runs; r++)); do
  for target in tunnel direct; do
    if [[ $target == tunnel ]]; then
      url="http://$public/" host=(--host bench)
    else
      url="http://$RT_ECHO_ADDR/" host=()
    fi
    txt=$RT_TMP/bench-$target-$r.txt
    rt_run_bounded $((secs + 120)) "$txt" "${RT_BENCH[@]}" "$url" "${host[@]}" \
      -c "$conns" -d "$duration" --warmup 2s || true
    # bench prints: label requests RPS p50 p90 p99 p99.9 max c/t/5xx/o
    awk -v t="$target" -v r="$r" '$1 ~ /^c=/ { printf "%-7s %-4s %9s %9s %8s %8s  %s\n", t, r, $2, $3, $4, $6, $NF }' \
      "$txt" >>"$rows"
  done
done
hwm=$(awk '/VmHWM/ { print $2 " " $3 }' /proc/"$gw_pid"/status)

summary=$(
  echo "$idle_line"
  echo
  printf '%-7s %-4s %9s %9s %8s %8s  %s\n' target run requests RPS p50_ms p99_ms "errors c/t/5xx/o"
  cat "$rows"
  echo
  echo "gateway peak RSS (VmHWM): $hwm"
)
echo "$summary"
{
  echo "# c=$conns on one session, ${delay} ms backend, default limits"
  echo
  rt_machine_facts
  echo
  echo "Command: scripts/c10k.sh --conns $conns --delay-ms $delay --duration $duration --runs $runs --idle $idle"
  echo
  rt_fenced <<<"$summary"
} >"$report"
rt_log "wrote $(rt_rel "$report")"
