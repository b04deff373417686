#!/usr/bin/env bash
# What the agent's line per request costs: the same load through an agent
# with --quiet and through one logging every request. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/request-lines.sh [options]

Starts echo (no delay) and, per case, a fresh gateway + agent on
127.0.0.1: once with `agent --quiet`, once logging one INFO line per
request (RUST_LOG=info, stderr to a file, as a service manager would
collect it). Runs `ringtunnel bench -c C` through the tunnel, quiet and
logged alternating, --runs times, and prints requests/s and the agent's
CPU per request (utime+stime from /proc/PID/stat over the measured run,
divided by the requests), medians, then the logged/quiet ratios.

Options:
  --conns C        concurrency (default 50)
  --duration D     measured time per case (default 5s)
  --runs N         repetitions of each case (default 3)
  --cores N        --cores for echo, gateway and agent (default: all)
  -h, --help       this text
EOF
}

conns=50 duration=5s runs=3 cores=""
while (($#)); do
  case $1 in
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init request-lines
rt_bin
core_args=()
[[ -n $cores ]] && core_args=(--cores "$cores")
rt_echo echo 0 "${core_args[@]}"
secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)
results=$RT_TMP/results.tsv
: >"$results"

one_case() {
  local mode=$1 run=$2 quiet=()
  [[ $mode == quiet ]] && quiet=(--quiet)
  rt_gateway "gw-$mode-$run" "${core_args[@]}"
  local gw_pid=$RT_GW_PID public=$RT_GW_PUBLIC name="agent-$mode-$run"
  rt_start "$name" env RUST_LOG=info "$RT_BIN" agent --gateway "$RT_GW_TUNNEL" \
    --session bench --to "$RT_ECHO_ADDR" "${quiet[@]}" "${core_args[@]}"
  local ag_pid=$RT_LAST_PID
  rt_wait_ready "$name" "ringtunnel agent ready"
  rt_run_bounded 60 "$RT_TMP/warm.txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
    -c "$conns" -d 1s --warmup 0s || true
  local a0 a1 txt=$RT_TMP/bench-$mode-$run.txt
  a0=$(rt_cpu_ticks "$ag_pid")
  rt_run_bounded $((secs + 60)) "$txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
    -c "$conns" -d "$duration" --warmup 0s || true
  a1=$(rt_cpu_ticks "$ag_pid")
  local lines
  lines=$(grep -c "ringtunnel::request" "$RT_TMP/$name.err" || true)
  rt_stop "$ag_pid"
  rt_stop "$gw_pid"
  # bench prints: label requests RPS p50 p90 p99 ...
  awk -v m="$mode" -v r="$run" -v a=$((a1 - a0)) -v t="$tck" -v l="$lines" '
    $1 ~ /^c=/ && $2 > 0 { printf "%s\t%s\t%s\t%s\t%.1f\t%s\n", m, r, $2, $3, a / t * 1e6 / $2, l }' \
    "$txt" >>"$results"
}

for ((r = 1; r <= runs; r++)); do
  one_case quiet "$r"
  one_case logged "$r"
done

python3 - "$results" "$conns" <<'PY'
import statistics as st, sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
by = {}
for mode, run, req, rps, ag, lines in rows:
    by.setdefault(mode, []).append((float(rps), float(ag), int(lines)))
print(f"c={sys.argv[2]}  mode    runs  RPS(med)  agent CPU us/req (med, range)  request lines logged (last run)")
for mode in ("quiet", "logged"):
    v = by.get(mode, [])
    if v:
        ag = [x[1] for x in v]
        print(f"        {mode:7} {len(v):<5} {st.median(x[0] for x in v):<9.0f} {st.median(ag):.1f} [{min(ag):.1f}-{max(ag):.1f}]{'':16} {v[-1][2]}")
if "quiet" in by and "logged" in by:
    q = [st.median(x[i] for x in by["quiet"]) for i in (0, 1)]
    g = [st.median(x[i] for x in by["logged"]) for i in (0, 1)]
    print(f"logged/quiet: RPS {g[0]/q[0]:.2f}x, agent CPU per request {g[1]/q[1]:.2f}x")
PY
