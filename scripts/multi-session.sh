#!/usr/bin/env bash
# Many sessions on one gateway: N agents (s1..sN) in front of one backend,
# an open-loop rate spread over all of them. Exits non-zero on any error.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/multi-session.sh [options]

One echo backend, one gateway, N agents claiming sessions s1..sN (all in
front of the same echo). The load generator sends an open-loop rate with
Host headers s1..sN round robin (`--hosts`). Prints the table, the error
count and p99, and exits 1 if any request failed.

Options:
  --sessions N       number of sessions / agents (default 10)
  --rate RPS         total requests per second over all sessions (default 5000)
  --duration D       measured duration (default 60s)
  --delay-ms MS      backend delay (default 35)
  --uplinks K        --uplinks per agent (default: the gateway's core count)
  --conns N          connection pool (default: enough for RATE at the delay, x3)
  --cores N          --cores for echo, gateway and each agent (default: all)
  --out DIR          output directory (default results/)
  -h, --help         this text

Writes DIR/multi-session.md, .txt, .json.
EOF
}

sessions=10 rate=5000 duration=60s delay=35 uplinks="" conns="" cores="" out=""
args=("$@")
while (($#)); do
  case $1 in
    --sessions) rt_need_arg "$@"; sessions=$2; shift 2 ;;
    --rate) rt_need_arg "$@"; rate=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --uplinks) rt_need_arg "$@"; uplinks=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
((sessions >= 1)) || { echo "--sessions must be at least 1" >&2; exit 2; }

rt_init multi-session
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/multi-session

if [[ -z $conns ]]; then
  conns=$(awk -v r="$rate" -v d="$delay" 'BEGIN { c = int(r * (d + 5) / 1000 * 3) + 1; if (c < 100) c = 100; print c }')
fi

role_flags=()
[[ -n $cores ]] && role_flags+=(--cores "$cores")
agent_flags=("${role_flags[@]}")
[[ -n $uplinks ]] && agent_flags+=(--uplinks "$uplinks")

rt_echo echo "$delay" "${role_flags[@]}"
rt_gateway gateway "${role_flags[@]}"
hosts=""
for i in $(seq 1 "$sessions"); do
  rt_agent "agent-s$i" "$RT_GW_TUNNEL" "s$i" "$RT_ECHO_ADDR" "${agent_flags[@]}"
  hosts+=${hosts:+,}s$i
done
rt_log "$sessions agents ready; rate $rate req/s over $hosts, pool $conns"

bench=(bench "http://$RT_GW_PUBLIC/" --hosts "$hosts" --rate "$rate" -c "$conns"
  -d "$duration" --warmup 1s --json "$base.json")
bound=$(($(rt_secs "$duration") + 60))
rc=0
rt_run_bounded "$bound" "$base.txt" "${RT_BENCH[@]}" "${bench[@]:1}" || rc=$?
cat "$base.txt"
((rc == 0)) || rt_die "bench failed (exit $rc)"

errors=$(rt_json_errors "$base.json")
p99=$(rt_json_rows "$base.json" rows | awk -F'\t' 'NR == 1 { print $6 }')
achieved=$(rt_json_rows "$base.json" rows | awk -F'\t' 'NR == 1 { print $3 }')
gw_errors=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_errors_total)
handoffs=$(rt_metric_sum "$RT_GW_ADMIN" ringtunnel_gateway_handoffs_total)
per_session=$(rt_get "$RT_GW_ADMIN" /stats | jq -c '.sessions' 2>/dev/null || echo n/a)

{
  rt_report_head "Multi-session: $sessions sessions, $rate req/s open loop, backend delay ${delay} ms" \
    "scripts/multi-session.sh ${args[*]}" "ringtunnel ${bench[*]}"
  rt_fenced <"$base.txt"
  echo "- errors: $errors; p99: $p99 ms; achieved: $achieved req/s of $rate offered"
  echo "- gateway error counters: $gw_errors; handoffs: $handoffs"
  echo "- uplinks per core by session: $per_session"
} >"$base.md"

echo
echo "errors: $errors"
echo "p99: $p99 ms"
echo "achieved: $achieved req/s of $rate offered"
echo "gateway error counters: $gw_errors; handoffs: $handoffs"
rt_log "wrote $base.md"
if ((errors > 0)); then
  rt_die "$errors requests failed"
fi
