#!/usr/bin/env bash
# ringtunnel vs the backend directly vs other tunnels you start yourself:
# the same load against each, one table. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/compare.sh [options] [--tunnel-start CMD --tunnel-url URL [--tunnel-stop CMD]
                                     [--tunnel-name NAME] [--tunnel-host HOST]]...

Starts one echo backend (with a delay) and a ringtunnel gateway + agent in
front of it, then sends the same closed-loop sweep to:
  direct       the echo backend itself
  ringtunnel   through the gateway (Host: demo)
  each other tunnel given with --tunnel-start/--tunnel-url, in order

Other tunnels: the --tunnel-* options describe one tunnel; repeating an
option that the current tunnel already has begins the next tunnel. CMD runs with `bash -c` in the background with
these variables set, so it can point the tunnel at the backend:
  RT_BACKEND=127.0.0.1:PORT  RT_BACKEND_HOST=127.0.0.1  RT_BACKEND_PORT=PORT
The script waits (up to 30 s) until URL answers with a 2xx, runs the load,
then runs the --tunnel-stop CMD (if any, bounded to 30 s) and ends the
process it started for --tunnel-start (by its PID). The other tunnel must
listen on 127.0.0.1 and serve echo's `/` route.

Options:
  --delay-ms MS      backend delay (default 35)
  --sweep LIST       concurrencies (default 1,10,100,1000)
  --duration D       measured time per row and target (default 5s)
  --warmup D         (default 1s)
  --no-ringtunnel    skip the ringtunnel stack (direct vs others only)
  --out DIR          output directory (default results/)
  --tunnel-start CMD   start a tunnel (see above)
  --tunnel-url URL     where it serves (http://127.0.0.1:PORT/)
  --tunnel-stop CMD    how to stop it (optional)
  --tunnel-name NAME   label in the table (default tunnelN)
  --tunnel-host HOST   Host header to send (default: from the URL)
  -h, --help         this text

Example (a second ringtunnel stack standing in for another tunnel):
  scripts/compare.sh --sweep 10,100 --duration 3s \
    --tunnel-name other --tunnel-url http://127.0.0.1:18080/ \
    --tunnel-start 'target/release/ringtunnel echo --listen 127.0.0.1:18080'

Writes DIR/compare.md, .txt and one .json per target.
EOF
}

delay=35 sweep=1,10,100,1000 duration=5s warmup=1s out="" with_rt=1
t_names=() t_starts=() t_stops=() t_urls=() t_hosts=()
args=("$@")
cur=-1
# A tunnel option starts a new tunnel when the current one already has it
# (or there is none yet), so the options of one tunnel may come in any order.
set_tunnel() {
  local field=$1 value=$2 have=""
  if ((cur >= 0)); then
    case $field in
      start) have=${t_starts[cur]} ;;
      stop) have=${t_stops[cur]} ;;
      url) have=${t_urls[cur]} ;;
      name) have=${t_names[cur]} ;;
      host) have=${t_hosts[cur]} ;;
    esac
  fi
  if ((cur < 0)) || [[ -n $have ]]; then
    cur=$((cur + 1))
    t_starts[cur]="" t_names[cur]="" t_stops[cur]="" t_urls[cur]="" t_hosts[cur]=""
  fi
  case $field in
    start) t_starts[cur]=$value ;;
    stop) t_stops[cur]=$value ;;
    url) t_urls[cur]=$value ;;
    name) t_names[cur]=$value ;;
    host) t_hosts[cur]=$value ;;
  esac
}
while (($#)); do
  case $1 in
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --sweep) rt_need_arg "$@"; sweep=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --warmup) rt_need_arg "$@"; warmup=$2; shift 2 ;;
    --no-ringtunnel) with_rt=0; shift ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    --tunnel-start) rt_need_arg "$@"; set_tunnel start "$2"; shift 2 ;;
    --tunnel-stop) rt_need_arg "$@"; set_tunnel stop "$2"; shift 2 ;;
    --tunnel-url) rt_need_arg "$@"; set_tunnel url "$2"; shift 2 ;;
    --tunnel-name) rt_need_arg "$@"; set_tunnel name "$2"; shift 2 ;;
    --tunnel-host) rt_need_arg "$@"; set_tunnel host "$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
for ((i = 0; i <= cur; i++)); do
  [[ -n ${t_names[i]} ]] || t_names[i]=tunnel$((i + 1))
  [[ -n ${t_starts[i]} ]] || { echo "tunnel ${t_names[i]}: --tunnel-start is required" >&2; exit 2; }
  [[ ${t_names[i]} =~ ^[A-Za-z0-9._-]+$ ]] || { echo "tunnel name '${t_names[i]}': use letters, digits, . _ -" >&2; exit 2; }
  [[ -n ${t_urls[i]} ]] || { echo "tunnel ${t_names[i]}: --tunnel-url is required" >&2; exit 2; }
  [[ ${t_urls[i]} == http://127.0.0.1:* || ${t_urls[i]} == http://localhost:* ]] ||
    { echo "tunnel ${t_names[i]}: --tunnel-url must be on 127.0.0.1 (loopback only)" >&2; exit 2; }
done

rt_init compare
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/compare
rows=$(rt_count_list "$sweep")
bound=$((rows * ($(rt_secs "$duration") + $(rt_secs "$warmup") + 12) + 60))

rt_echo echo "$delay"
export RT_BACKEND=$RT_ECHO_ADDR RT_BACKEND_HOST=${RT_ECHO_ADDR%:*} RT_BACKEND_PORT=${RT_ECHO_ADDR##*:}
if ((with_rt)); then
  rt_gateway gateway
  rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR"
fi

# run_target NAME URL HOST -> appends to $base.txt, writes $base-NAME.json
run_target() {
  local name=$1 url=$2 host=$3 rc=0
  local bench=(bench "$url" --sweep "$sweep" -d "$duration" --warmup "$warmup" --json "$base-$name.json")
  [[ -n $host ]] && bench+=(--host "$host")
  rt_log "$name: ringtunnel ${bench[*]}"
  rt_run_bounded "$bound" "$RT_TMP/bench.out" "${RT_BENCH[@]}" "${bench[@]:1}" || rc=$?
  { echo "## $name"; cat "$RT_TMP/bench.out"; echo; } >>"$base.txt"
  ((rc == 0)) || rt_die "bench against $name failed (exit $rc)"
  cmds+=("$(rt_rel "ringtunnel ${bench[*]}")")
}

wait_http() {
  local url=$1 host=$2 pid=$3 deadline=$((SECONDS + 30))
  local hdr=()
  [[ -n $host ]] && hdr=(-H "Host: $host")
  while ((SECONDS < deadline)); do
    if curl -fsS --max-time 2 -o /dev/null "${hdr[@]}" "$url" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  rt_show_log "$4"
  rt_die "$url did not answer with a 2xx within 30s"
}

: >"$base.txt"
cmds=()
targets=(direct)
run_target direct "http://$RT_ECHO_ADDR/" ""
if ((with_rt)); then
  targets+=(ringtunnel)
  run_target ringtunnel "http://$RT_GW_PUBLIC/" demo
fi
for ((i = 0; i <= cur; i++)); do
  name=${t_names[i]}
  rt_log "$name: starting: ${t_starts[i]}"
  rt_start "tunnel-$name" bash -c "${t_starts[i]}"
  tpid=$RT_LAST_PID
  wait_http "${t_urls[i]}" "${t_hosts[i]}" "$tpid" "tunnel-$name"
  targets+=("$name")
  run_target "$name" "${t_urls[i]}" "${t_hosts[i]}"
  if [[ -n ${t_stops[i]} ]]; then
    rt_log "$name: stopping: ${t_stops[i]}"
    timeout 30 bash -c "${t_stops[i]}" || rt_log "$name: stop command failed (exit $?)"
  fi
  rt_stop "$tpid"
done

# One table: every target's rows, with ratios to direct at the same concurrency.
table=$(
  printf '%-14s %-8s %10s %9s %9s %9s %9s %8s %9s\n' target label RPS p50_ms p90_ms p99_ms "rps/dir" "p50-dir" errors
  rt_json_rows "$base-direct.json" rows >"$RT_TMP/direct.tsv"
  for t in "${targets[@]}"; do
    rt_json_rows "$base-$t.json" rows | awk -F'\t' -v t="$t" '
      NR == FNR { rps[$1] = $3; p50[$1] = $4; next }
      {
        r = ($1 in rps && rps[$1] > 0) ? sprintf("%.2fx", $3 / rps[$1]) : "n/a"
        d = ($1 in p50) ? sprintf("%+.2f", $4 - p50[$1]) : "n/a"
        printf "%-14s %-8s %10.1f %9.2f %9.2f %9.2f %9s %8s %9d\n", t, $1, $3, $4, $5, $6, r, d, $9
      }' "$RT_TMP/direct.tsv" -
  done
)

{
  rt_report_head "Tunnel comparison: backend delay ${delay} ms" \
    "scripts/compare.sh ${args[*]}" "${cmds[@]}"
  rt_fenced <<<"$table"
  echo "Latencies in ms; rps/dir and p50-dir compare with the direct row of the same"
  echo "concurrency. Targets ran one after another (not interleaved). Raw: $(basename "$base").txt"
} >"$base.md"

echo
echo "$table"
rt_log "wrote $base.md"
