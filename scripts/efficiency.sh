#!/usr/bin/env bash
# What a request costs in CPU, per process: direct to the backend, through
# ringtunnel, and through an nginx reverse-proxy hop, under wrk and under
# `ringtunnel bench`, keep-alive and `Connection: close`. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/efficiency.sh [options]

For every case and every run, in one invocation and alternating, it loads
three targets with the same load:
  direct     the echo backend itself
  ringtunnel gateway + agent (one session) in front of the same echo
  nginx      an nginx reverse-proxy hop in front of the same echo
             (upstream keep-alive, proxy_http_version 1.1; Debian's nginx,
             installed if missing, run from a temp dir as our own process)
with wrk (-t1, installed from Debian if missing) and `ringtunnel bench`.

Per case, target and tool it prints requests/s, p50 and p99, and CPU
microseconds per request for each process separately (gateway, agent,
nginx, echo), divided by the requests, as the median over --runs runs
with the range, because single runs on a shared machine vary by 2-3x:
  on-CPU   the threads' run time from /proc/PID/task/*/schedstat (exact;
           the "hop CPU" headline, gateway + agent or nginx)
  ticks    utime and stime from /proc/PID/stat, user and kernel apart
           (whole clock ticks: coarse at light load, where a run holds
           only a few ticks per process)

Cases are MODE:CONNS:DELAY_MS, MODE = ka (keep-alive) or close (a new
connection per request). Default: the rows of the efficiency issue,
  ka:100:0 ka:1000:0 close:10:0 close:100:0 ka:10:35 ka:1000:35

Options:
  --cases LIST       comma-separated cases (default above)
  --tools LIST       wrk,bench (default both)
  --targets LIST     direct,ringtunnel,nginx (default all)
  --runs N           runs per case (default 3)
  --duration D       measured time per run (default 5s)
  --cores N          --cores for echo, gateway and agent (default: all)
  --nginx-workers N  nginx worker_processes (default: auto)
  --driver D         auto|uring|legacy for every ringtunnel role (default auto)
  --out DIR          output directory (default results/)
  -h, --help         this text
EOF
}

cases=ka:100:0,ka:1000:0,close:10:0,close:100:0,ka:10:35,ka:1000:35
tools=wrk,bench targets=direct,ringtunnel,nginx runs=3 duration=5s cores=""
nginx_workers=auto driver=auto out=""
while (($#)); do
  case $1 in
    --cases) rt_need_arg "$@"; cases=$2; shift 2 ;;
    --tools) rt_need_arg "$@"; tools=$2; shift 2 ;;
    --targets) rt_need_arg "$@"; targets=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --nginx-workers) rt_need_arg "$@"; nginx_workers=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init efficiency
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/efficiency.md
role_args=(--driver "$driver")
[[ -n $cores ]] && role_args+=(--cores "$cores")

need=()
[[ ,$tools, == *,wrk,* ]] && need+=(wrk:wrk)
[[ ,$targets, == *,nginx,* ]] && need+=(nginx:nginx-light)
rt_apt_install "${need[@]}"

secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)
rows=$RT_TMP/rows.tsv
: >"$rows"

# utime and stime of a process and, for nginx, of its workers (clock ticks,
# the user/kernel split), then their threads' on-CPU time in nanoseconds
# from /proc/PID/task/*/schedstat. utime/stime come in whole ticks (10 ms)
# per process, which at a light load (a few hundred requests a second) is
# several microseconds per request of rounding; schedstat has none.
ticks() {
  local pid total_u=0 total_s=0 total_ns=0 stat rest f ns _
  local -a fl
  for pid in "$@"; do
    [[ -r /proc/$pid/stat ]] || continue
    stat=$(<"/proc/$pid/stat")
    rest=${stat##*) }
    read -r -a fl <<<"$rest"
    total_u=$((total_u + fl[11]))
    total_s=$((total_s + fl[12]))
    for f in /proc/"$pid"/task/*/schedstat; do
      read -r ns _ <"$f" 2>/dev/null || continue
      total_ns=$((total_ns + ns))
    done
  done
  echo "$total_u $total_s $total_ns"
}

# ticks of nginx's master and workers together.
nginx_ticks() {
  local -a all
  read -r -a all <<<"$NGINX_PID $(pgrep -P "$NGINX_PID" 2>/dev/null | tr '\n' ' ')"
  ticks "${all[@]}"
}

# start_nginx UPSTREAM -> NGINX_ADDR, NGINX_PID
start_nginx() {
  local upstream=$1
  rt_nginx_proxy "$upstream" "$nginx_workers"
}

# load TOOL MODE CONNS URL HOST OUTFILE: one measured run; prints
# "requests rps p50_ms p99_ms" or nothing on failure.
load() {
  local tool=$1 mode=$2 c=$3 url=$4 host=$5 outf=$6
  if [[ $tool == wrk ]]; then
    local hdr=()
    [[ $mode == close ]] && hdr=(-H "Connection: close")
    rt_run_bounded $((secs + 30)) "$outf" wrk -t1 -c "$c" -d "$duration" --latency \
      -H "Host: $host" "${hdr[@]}" "$url" || true
    rt_wrk_stats "$outf"
  else
    local ka=()
    [[ $mode == close ]] && ka=(--no-keepalive)
    rt_run_bounded $((secs + 60)) "$outf" "${RT_BENCH[@]}" "$url" --host "$host" -c "$c" \
      -d "$duration" --warmup 0s "${ka[@]}" || true
    awk '$1 ~ /^c=/ && $2 > 0 { printf "%d %.1f %s %s\n", $2, $3, $4, $6 }' "$outf" | tail -1
  fi
}

IFS=, read -r -a case_list <<<"$cases"
IFS=, read -r -a tool_list <<<"$tools"
IFS=, read -r -a target_list <<<"$targets"

for spec in "${case_list[@]}"; do
  IFS=: read -r mode c delay <<<"$spec"
  [[ $mode == ka || $mode == close ]] || rt_die "case $spec: mode must be ka or close"
  rt_log "case $spec"
  rt_echo "echo-$delay-$c-$mode" "$delay" "${role_args[@]}"
  echo_pid=$RT_ECHO_PID echo_addr=$RT_ECHO_ADDR
  rt_gateway "gw-$spec" "${role_args[@]}"
  gw_pid=$RT_GW_PID gw_public=$RT_GW_PUBLIC
  rt_agent "agent-$spec" "$RT_GW_TUNNEL" bench "$echo_addr" "${role_args[@]}"
  ag_pid=$RT_AGENT_PID
  NGINX_PID="" NGINX_ADDR=""
  [[ ,$targets, == *,nginx,* ]] && start_nginx "$echo_addr"
  for ((r = 1; r <= runs; r++)); do
    for tool in "${tool_list[@]}"; do
      for target in "${target_list[@]}"; do
        case $target in
          direct) url=http://$echo_addr/ pids=("$echo_pid") names=(echo) ;;
          ringtunnel) url=http://$gw_public/ pids=("$gw_pid" "$ag_pid" "$echo_pid") names=(gateway agent echo) ;;
          nginx) url=http://$NGINX_ADDR/ pids=(nginx "$echo_pid") names=(nginx echo) ;;
          *) rt_die "unknown target $target" ;;
        esac
        before=()
        for p in "${pids[@]}"; do
          if [[ $p == nginx ]]; then before+=("$(nginx_ticks)"); else before+=("$(ticks "$p")"); fi
        done
        res=$(load "$tool" "$mode" "$c" "$url" bench "$RT_TMP/$tool-$target-$spec-$r.txt")
        i=0
        for p in "${pids[@]}"; do
          if [[ $p == nginx ]]; then after=$(nginx_ticks); else after=$(ticks "$p"); fi
          read -r u0 s0 n0 <<<"${before[$i]}"
          read -r u1 s1 n1 <<<"$after"
          if [[ -n $res ]]; then
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$spec" "$tool" "$target" "$r" "$res" \
              "${names[$i]}" $((u1 - u0)) $((s1 - s0)) $((n1 - n0)) >>"$rows"
          fi
          i=$((i + 1))
        done
        [[ -z $res ]] && rt_log "no result: $tool $target $spec run $r"
      done
    done
  done
  [[ -n $NGINX_PID ]] && rt_stop "$NGINX_PID"
  rt_stop "$ag_pid"
  rt_stop "$gw_pid"
  rt_stop "$echo_pid"
done

summary=$(python3 - "$rows" "$tck" <<'PY'
import statistics as st, sys
tck = float(sys.argv[2])
runs = {}
for line in open(sys.argv[1]):
    spec, tool, target, run, res, proc, ut, kt, ns = line.rstrip("\n").split("\t")
    req, rps, p50, p99 = res.split()
    key = (spec, tool, target)
    r = runs.setdefault(key, {}).setdefault(run, {"req": float(req), "rps": float(rps), "p50": float(p50), "p99": float(p99), "cpu": {}})
    r["cpu"][proc] = (float(ut) / tck * 1e6 / float(req), float(kt) / tck * 1e6 / float(req))
    r.setdefault("oncpu", {})[proc] = float(ns) / 1e3 / float(req)

def fmt(vals, digits=1):
    return f"{st.median(vals):.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"

specs = []
for k in runs:
    if k[0] not in specs:
        specs.append(k[0])
for spec in specs:
    print(f"== {spec}  (mode:conns:backend delay ms)")
    for (s, tool, target), rs in runs.items():
        if s != spec:
            continue
        v = list(rs.values())
        cpu_tot = []
        parts = []
        procs = [p for p in ("gateway", "agent", "nginx", "echo") if p in v[0]["cpu"]]
        for p in procs:
            u = [x["cpu"][p][0] for x in v if p in x["cpu"]]
            k = [x["cpu"][p][1] for x in v if p in x["cpu"]]
            parts.append(f"{p} usr {fmt(u)} sys {fmt(k)}")
        hop = [sum(x["oncpu"][p] for p in procs if p != "echo") for x in v]
        hop_ticks = [sum(sum(x["cpu"][p]) for p in procs if p != "echo") for x in v]
        each = "; ".join(f"{p} {fmt([x['oncpu'][p] for x in v])}" for p in procs)
        line = (f"  {tool:5} {target:10} n={len(v)} RPS {fmt([x['rps'] for x in v], 0)}"
                f"  p50 {fmt([x['p50'] for x in v], 2)} ms  p99 {fmt([x['p99'] for x in v], 2)} ms")
        print(line)
        if target != "direct":
            print(f"        hop CPU us/req (all but echo) {fmt(hop)}   [from ticks: {fmt(hop_ticks)}]")
        print(f"        on-CPU us/req: {each}")
        print("        ticks: " + "; ".join(parts))
    print()
PY
)
echo "$summary"
{
  rt_report_head "Efficiency: CPU per request, direct vs ringtunnel vs nginx" \
    "scripts/efficiency.sh --cases $cases --tools $tools --targets $targets --runs $runs --duration $duration"
  rt_fenced <<<"$summary"
} >"$report"
rt_log "wrote $(rt_rel "$report")"
