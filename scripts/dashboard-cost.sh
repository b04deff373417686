#!/usr/bin/env bash
# What an open dashboard costs the gateway: the same load with no page and
# with a headless Chromium showing the dashboard, alternating. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/dashboard-cost.sh [options]

Starts echo, a gateway and an agent on 127.0.0.1, then runs
`ringtunnel bench -c C` through the tunnel for --duration, --runs times in
each mode, alternating:
  none       nobody looks at the admin endpoint
  dashboard  a headless Chromium (Debian's chromium, installed if missing)
             has the dashboard (GET /) open for the whole run, polling
             /stats?limit=25 every second

Per mode it prints requests/s and p99 (from bench), the gateway's CPU per
request (utime+stime of the gateway process from /proc/PID/stat over the
measured run, divided by the requests; the admin thread is part of that
process) and how many admin requests were served during the run
(`admin_requests` of /stats, less the script's own read) with the CPU
the gateway's admin thread used per request (its /proc/PID/task entry:
the cost of one poll, independent of the noise in the totals), and the
CPU the browser itself used (its process tree, in % of one core: on this
shared machine it competes with the roles and the load generator), then
the dashboard/none ratio of each median.

Options:
  --delay-ms MS    backend delay (default 0: the gateway as busy as it gets)
  --conns C        concurrency (default 50)
  --duration D     measured time per run (default 10s)
  --runs N         runs of each mode (default 3); medians reported
  --cores N        --cores for echo, gateway and agent (default: all)
  --sessions N     sessions the gateway holds (default 1): N-1 idle ones
                   are claimed by fake uplinks (a Python helper sending
                   HELLO and holding the connection; the gateway then runs
                   with --heartbeat-interval 60 so they are not closed as
                   silent), to see what a poll costs with many sessions
  --out DIR        output directory (default results/)
  -h, --help       this text
EOF
}

delay=0 conns=50 duration=10s runs=3 cores="" out="" sessions=1
while (($#)); do
  case $1 in
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --sessions) rt_need_arg "$@"; sessions=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init dashboard-cost
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/dashboard-cost-s$sessions.md
core_args=()
[[ -n $cores ]] && core_args=(--cores "$cores")

if ! command -v chromium >/dev/null 2>&1; then
  rt_log "installing chromium (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

rt_echo echo "$delay" "${core_args[@]}"
gw_extra=()
((sessions > 1)) && gw_extra=(--heartbeat-interval 60)
rt_gateway gw "${core_args[@]}" "${gw_extra[@]}"
gw_pid=$RT_GW_PID public=$RT_GW_PUBLIC admin=$RT_GW_ADMIN
rt_agent agent "$RT_GW_TUNNEL" bench "$RT_ECHO_ADDR" "${core_args[@]}"
if ((sessions > 1)); then
  # Fake agents: one uplink each (docs/PROTOCOL.md 2 and 4.1), held open
  # and silent for at most 10 minutes.
  cat >"$RT_TMP/idle-sessions.py" <<'PY'
import socket, struct, sys, time
host, port = sys.argv[1].rsplit(":", 1)
held = []
for i in range(int(sys.argv[2])):
    name = b"idle-%04d" % i
    hello = b"RTNL" + struct.pack(">HIQHHH", 1, 0, 1000 + i, 0, 1, 0) + struct.pack(">H", len(name)) + name
    s = socket.create_connection((host, int(port)))
    s.sendall(struct.pack(">IBBHI", len(hello), 0x01, 0, 0, 0) + hello)
    head = s.recv(12)
    if len(head) < 12 or head[4] != 0x02:
        sys.exit("no ACCEPT for %s" % name.decode())
    held.append(s)
print("idle sessions ready", flush=True)
time.sleep(600)
PY
  rt_start idle-sessions python3 "$RT_TMP/idle-sessions.py" "$RT_GW_TUNNEL" $((sessions - 1))
  rt_wait_ready idle-sessions "idle sessions ready" 120
fi
secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)
results=$RT_TMP/results.tsv
: >"$results"

# Requests the admin endpoint has served (this read included).
admin_requests() {
  rt_get "$admin" /stats | python3 -c 'import json, sys; print(json.load(sys.stdin)["admin_requests"])'
}

# CPU ticks of PID and its descendants (the browser's renderer, GPU and
# utility processes are its children or grandchildren).
tree_ticks() {
  local pid=$1 t c
  t=$(rt_cpu_ticks "$pid" 2>/dev/null || echo 0)
  for c in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    t=$((t + $(tree_ticks "$c")))
  done
  echo "$t"
}

# The TID of the gateway's admin thread (named "admin").
admin_tid=""
for t in /proc/"$gw_pid"/task/*; do
  if [[ $(<"$t/comm") == admin ]]; then admin_tid=${t##*/}; fi
done
[[ -n $admin_tid ]] || rt_die "no thread named admin in the gateway"

# Nanoseconds the admin thread has run (schedstat: clock ticks are too
# coarse for a thread that works a few hundred microseconds a second).
admin_ns() {
  local ns _
  read -r ns _ <"/proc/$gw_pid/task/$admin_tid/schedstat"
  echo "$ns"
}

# one_run MODE RUN: one bench run, one TSV row.
one_run() {
  local mode=$1 run=$2 browser=""
  if [[ $mode == dashboard ]]; then
    local profile=$RT_TMP/profile-$run
    mkdir -p "$profile"
    rt_start "chromium-$run" chromium --headless --no-sandbox --disable-gpu \
      --disable-quic --no-first-run --disable-background-networking \
      --disable-component-update --disable-sync --user-data-dir="$profile" \
      "http://$admin/"
    browser=$RT_LAST_PID
    # The page loads and starts polling before the measurement.
    sleep 3
  fi
  local polls0 g0 g1 polls1 b0=0 b1=0 a0 a1
  polls0=$(admin_requests)
  a0=$(admin_ns)
  [[ -n $browser ]] && b0=$(tree_ticks "$browser")
  g0=$(rt_cpu_ticks "$gw_pid")
  local txt=$RT_TMP/bench-$mode-$run.txt
  rt_run_bounded $((secs + 60)) "$txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
    -c "$conns" -d "$duration" --warmup 0s || true
  g1=$(rt_cpu_ticks "$gw_pid")
  [[ -n $browser ]] && b1=$(tree_ticks "$browser")
  polls1=$(admin_requests)
  a1=$(admin_ns)
  [[ -n $browser ]] && rt_stop "$browser"
  # bench prints: label requests RPS p50 p90 p99 ...
  awk -v m="$mode" -v r="$run" -v g=$((g1 - g0)) -v t="$tck" -v p=$((polls1 - polls0 - 1)) \
    -v b=$((b1 - b0)) -v s="$secs" -v a=$((a1 - a0)) '
    $1 ~ /^c=/ && $2 > 0 {
      printf "%s\t%s\t%s\t%s\t%s\t%.2f\t%d\t%.1f\t%d\n", m, r, $2, $3, $6, g / t * 1e6 / $2, p, b / t * 100 / s, a / 1000
    }' "$txt" >>"$results"
}

# Warm-up (pools, windows), unmeasured.
rt_run_bounded 60 "$RT_TMP/warm.txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
  -c "$conns" -d 2s --warmup 0s || true
for ((r = 1; r <= runs; r++)); do
  one_run none "$r"
  one_run dashboard "$r"
done

summary=$(python3 - "$results" <<'PY'
import statistics as st, sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
by = {}
for mode, run, req, rps, p99, cpu, polls, browser, admin_us in rows:
    by.setdefault(mode, []).append((float(rps), float(p99), float(cpu), int(polls), float(browser), int(admin_us)))
print("mode       runs  RPS(med)  p99 ms(med)  gateway CPU us/req (med, range)  admin polls/run  browser CPU % of a core")
med = {}
for mode in ("none", "dashboard"):
    v = by.get(mode, [])
    if not v:
        continue
    rps = st.median(x[0] for x in v); p99 = st.median(x[1] for x in v)
    cpu = [x[2] for x in v]
    med[mode] = (rps, st.median(cpu))
    polls = ",".join(str(x[3]) for x in v)
    browser = ",".join(f"{x[4]:.1f}" for x in v)
    print(f"{mode:10} {len(v):<5} {rps:<9.0f} {p99:<12.2f} {st.median(cpu):.2f} [{min(cpu):.2f}-{max(cpu):.2f}]{'':14} {polls:<16} {browser}")
# Between the two readings: the page's polls and the script's second read.
polls = sum(x[3] + 1 for x in by.get("dashboard", []))
admin_us = sum(x[5] for x in by.get("dashboard", []))
if polls:
    print()
    print(f"gateway admin thread: {admin_us} us of CPU for {polls} admin requests in the dashboard runs "
          f"({admin_us / polls:.0f} us each)")
if "none" in med and "dashboard" in med:
    n, d = med["none"], med["dashboard"]
    print()
    print(f"dashboard/none: RPS {d[0]/n[0]:.3f}x, gateway CPU per request {d[1]/n[1]:.3f}x")
PY
)
echo "$summary"
{
  echo "# Dashboard cost, ${delay} ms backend, c=$conns, $sessions session(s)"
  echo
  rt_machine_facts
  echo
  echo "Command: scripts/dashboard-cost.sh --delay-ms $delay --conns $conns --duration $duration --runs $runs --sessions $sessions${cores:+ --cores $cores}"
  echo
  rt_fenced <<<"$summary"
} >"$report"
rt_log "wrote $(rt_rel "$report")"
