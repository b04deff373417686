#!/usr/bin/env bash
# Open-loop rate ramp through the tunnel: does it hold 1000 RPS and beyond,
# step after step, without errors? See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/ramp-up.sh [options]

Starts echo (with a delay) + gateway + agent on 127.0.0.1 and sends an
open-loop ramp through the tunnel: START req/s for STEP_EVERY, then
START+STEP, ... up to END, each step sustained for STEP_EVERY. Latency is
measured from each request's intended send time (no coordinated omission).

Options:
  --start RPS        first rate (default 100)
  --end RPS          last rate (default 2000)
  --step-every D     how long each rate is held (default 5s)
  --step RPS         rate increment (default (END-START)/10)
  --delay-ms MS      backend delay (default 35)
  --conns N          connection pool of the load generator
                     (default: enough for END req/s at the backend delay, x3)
  --cores N          --cores for echo, gateway and agent (default: all)
  --out DIR          output directory (default results/)
  --allow-errors     exit 0 even when requests failed
  -h, --help         this text

Writes DIR/ramp-up.md, .txt, .json, .svg. Exits 1 if any request failed
(unless --allow-errors) and says at which rate the first errors came and
where the achieved rate fell below 95% of the offered rate.
EOF
}

start=100 end=2000 step_every=5s step="" delay=35 conns="" cores="" out="" allow_errors=0
args=("$@")
while (($#)); do
  case $1 in
    --start) rt_need_arg "$@"; start=$2; shift 2 ;;
    --end) rt_need_arg "$@"; end=$2; shift 2 ;;
    --step-every) rt_need_arg "$@"; step_every=$2; shift 2 ;;
    --step) rt_need_arg "$@"; step=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    --allow-errors) allow_errors=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

rt_init ramp-up
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/ramp-up

# Little's law: in flight = rate x latency; keep 3x headroom, at least 100.
if [[ -z $conns ]]; then
  conns=$(awk -v r="$end" -v d="$delay" 'BEGIN { c = int(r * (d + 5) / 1000 * 3) + 1; if (c < 100) c = 100; print c }')
fi
ramp=$start:$end:$step_every
[[ -n $step ]] && ramp+=":$step"

role_flags=()
[[ -n $cores ]] && role_flags+=(--cores "$cores")
rt_echo echo "$delay" "${role_flags[@]}"
rt_gateway gateway "${role_flags[@]}"
rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR" "${role_flags[@]}"

steps=$(awk -v s="$start" -v e="$end" -v st="$step" 'BEGIN {
  if (st == "") { st = (e > s ? e - s : s - e) / 10; if (st < 1) st = 1 }
  n = 0; r = s; while ((e >= s && r < e - 1e-9) || (e < s && r > e + 1e-9)) { n++; r += (e >= s ? st : -st) }
  print n + 1 }')
bound=$((steps * ($(rt_secs "$step_every") + 2) + 60))

bench=(bench "http://$RT_GW_PUBLIC/" --host demo --ramp "$ramp" -c "$conns"
  --warmup 1s --json "$base.json" --svg "$base.svg")
rt_log "ramp $ramp over $steps steps, pool of $conns connections (bounded to ${bound}s)"
rc=0
rt_run_bounded "$bound" "$base.txt" "${RT_BENCH[@]}" "${bench[@]:1}" || rc=$?
cat "$base.txt"
((rc == 0)) || rt_die "bench failed (exit $rc)"

gw_errors=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_errors_total)
errors=$(rt_json_errors "$base.json")
# Offered rate is the row label's number; flag the first error row and the
# first row that fell behind.
summary=$(rt_json_rows "$base.json" rows | awk -F'\t' '
  {
    offered = $1; gsub(/[^0-9.]/, "", offered)
    if (first_err == "" && $9 > 0) first_err = $1
    if (first_slow == "" && offered > 0 && $3 < 0.95 * offered) first_slow = $1
    if ($9 == 0 && $3 >= 0.95 * offered && $3 > best) best = $3
  }
  END {
    printf "highest error-free step that kept up: %s req/s\n", best == "" ? "none" : best
    printf "first step with errors: %s\n", first_err == "" ? "none" : first_err
    printf "first step below 95%% of the offered rate: %s\n", first_slow == "" ? "none" : first_slow
  }')

{
  rt_report_head "Ramp-up through the tunnel (backend delay ${delay} ms)" \
    "scripts/ramp-up.sh ${args[*]}" "ringtunnel ${bench[*]}"
  rt_fenced <"$base.txt"
  echo "- failed requests (bench): $errors; gateway error counters: $gw_errors"
  echo "$summary" | sed 's/^/- /'
} >"$base.md"

echo
echo "failed requests: $errors (gateway error counters: $gw_errors)"
echo "$summary"
rt_log "wrote $base.md"
if ((errors > 0 && !allow_errors)); then
  rt_die "$errors requests failed"
fi
