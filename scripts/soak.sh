#!/usr/bin/env bash
# Soak benchmark: does anything grow while the gateway and the agent run a
# mixed, partly abusive load for a long time? See --help.
#
# What it measures, once a second, into DIR/soak.csv:
#   gateway and agent: RSS (VmRSS, KiB) and open fds (/proc/PID/...);
#   gateway /metrics: ringtunnel_active_streams, ringtunnel_gateway_connections
#     (open public connections), ringtunnel_uplinks (sums over cores);
#   gateway CLOSE_WAIT sockets on its public port (/proc/PID/net/tcp):
#     connections the client closed and the gateway never did (a client
#     that reset the connection leaves no CLOSE_WAIT; only fds show it);
#   agent /metrics: ringtunnel_active_streams, ringtunnel_uplinks;
#   agent connections to the backend (its sockets to the echo port).
#
# Load, all on 127.0.0.1, all at once for --duration (default 10 min):
#   - keep-alive load: `ringtunnel bench` open loop (--rate, -c) in rounds
#     of at most 10 s, each under `timeout`;
#   - misbehaving clients (scripts/soak.py clients): aborted uploads
#     (POST /echo with Content-Length: 100000, part of the body, close),
#     downloads of /bytes/50000000 cancelled after ~30 ms, stalled readers
#     (GET /bytes/20000000, read nothing for 5-20 s, close; 4 at a time),
#     bad chunked bodies (`zz\r\n` chunk size, ...) and garbage bytes;
#   - agent restarts every --restart-every seconds (default duration/10,
#     at least 5 s) during the first 70% of the load, so the last agent
#     still lives through 30% of it; one of them is SIGKILL, the rest
#     SIGTERM. The agent's series are those of whichever agent is running.
#
# Bounds: every client socket has a 2 s timeout; every client loop has a
# deadline and a count cap; every bench round and the client process run
# under `timeout`; every curl has --max-time. All processes are started
# through scripts/lib.sh and ended by PID (EXIT/INT/TERM trap), never by
# name.
#
# Timeline: warm-up (bench, a few complete 20 MB downloads and 100 kB
# uploads, stalled readers and cancelled downloads; no bad input) ->
# settle (no load; the "baseline" rows) -> load -> drain (clients
# finishing) -> quiet (no load, --quiet seconds; the "end" rows).
#
# How to read the result: the summary table has, per series, the value at
# start (last baseline row, after the warm-up), the max over the run and
# the value at the end (last quiet row), and a verdict:
#   gauges (streams, connections, uplinks, CLOSE_WAIT): must be back at
#     their start value, else GREW (or DROPPED, e.g. uplinks not back);
#   fds: end <= start + 4, a margin for descriptors that come and go
#     (the admin endpoint's own connection, an eventfd). For the agent the
#     verdict is on its fds minus its backend connections: it keeps idle
#     keep-alive connections to the backend (a pool bounded per core,
#     without idle expiry), so its raw fd count follows the peak backend
#     concurrency it has seen, not time (both are shown, as info);
#   RSS: end <= start + max(20%, 8 MiB). The allocator (mimalloc) keeps
#     freed pages cached per thread and returns them lazily, and a long
#     run reaches buffer and stream-count peaks (stalled readers, big
#     bodies, bursts after an agent restart) that the short warm-up may
#     not, so a healthy process can sit a few MiB above its warm baseline
#     for good (a 60 s run without the leaking client kinds ended 2.6 MiB
#     above a 15 MiB gateway baseline). 8 MiB is the floor because the
#     baselines are small (~9-15 MiB), where 20% is within that noise. A
#     real per-request or per-connection leak is far above either: the
#     default run makes ~300k requests and ~9k misbehaving connections, so
#     even 1 KiB per request is ~300 MiB.
# Exit status 1 if any series did not end flat; the CSV and an SVG chart
# (one small plot per series, drawn by scripts/soak.py) are in --out.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/soak.sh [--duration SECS] [--out DIR] [options]

Starts echo + gateway + agent (both with --admin-listen) on 127.0.0.1 and
runs, at the same time for the duration: keep-alive bench load, aborted
uploads, cancelled downloads, stalled readers, bad chunked bodies and
garbage bytes, and periodic agent restarts (SIGTERM, once SIGKILL).
Samples RSS, fds, streams, connections and uplinks of the gateway and the
agent once a second; after a quiet period prints start/max/end and a
flat/GREW verdict per series. Exits 1 if any series grew.

Options:
  --duration SECS     load duration (default 600; 60s, 10m also accepted)
  --out DIR           output directory (default: a new mktemp directory)
  --rate RPS          bench open-loop rate (default 500)
  --conns N           bench connection pool (default 20)
  --warmup SECS       warm-up before the baseline (default duration/10, 5..30)
  --quiet SECS        quiet period before the end values (default 5)
  --restart-every S   agent restart interval (default duration/10, >= 5; 0 = none)
  --session NAME      session name / Host header (default soak)
  --clients LIST      misbehaving client kinds to run (default all:
                      aborted_upload,cancelled_download,stalled_reader,bad_chunked,garbage;
                      "none" for bench load and restarts only)
  -h, --help          this text

Writes DIR/soak.csv (per-second samples), DIR/soak.svg (charts),
DIR/summary.txt (the printed summary), DIR/soak.md (command, machine,
summary), DIR/bench/round-*.json|txt, DIR/clients.txt, DIR/restarts.txt
and DIR/logs/ (role logs).
EOF
}

duration=600 out="" rate=500 conns=20 warmup="" quiet=5 restart_every="" session=soak
clients=aborted_upload,cancelled_download,stalled_reader,bad_chunked,garbage
args=("$@")
while (($#)); do
  case $1 in
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    --rate) rt_need_arg "$@"; rate=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --warmup) rt_need_arg "$@"; warmup=$2; shift 2 ;;
    --quiet) rt_need_arg "$@"; quiet=$2; shift 2 ;;
    --restart-every) rt_need_arg "$@"; restart_every=$2; shift 2 ;;
    --session) rt_need_arg "$@"; session=$2; shift 2 ;;
    --clients) rt_need_arg "$@"; clients=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

duration=$(rt_secs "$duration")
if [[ ! $duration =~ ^[0-9]+$ ]] || ((duration < 10)); then
  rt_die "--duration must be a whole number of seconds, at least 10"
fi
if [[ -z $warmup ]]; then
  warmup=$((duration / 10))
  ((warmup < 5)) && warmup=5
  ((warmup > 30)) && warmup=30
fi
warmup=$(rt_secs "$warmup")
quiet=$(rt_secs "$quiet")
((quiet >= 2)) || rt_die "--quiet must be >= 2 seconds"
if [[ -z $restart_every ]]; then
  restart_every=$((duration / 10))
  ((restart_every < 5)) && restart_every=5
fi
restart_every=$(rt_secs "$restart_every")
IFS=, read -r -a kinds <<<"$clients"
for k in "${kinds[@]}"; do
  case $k in
    aborted_upload | cancelled_download | stalled_reader | bad_chunked | garbage | none) ;;
    *) rt_die "unknown --clients kind: $k (see --help)" ;;
  esac
done

rt_init soak
rt_bin
command -v python3 >/dev/null || rt_die "python3 is needed (clients and report)"
helper=$RT_ROOT/scripts/soak.py

if [[ -z $out ]]; then
  out=$(mktemp -d "${TMPDIR:-/tmp}/ringtunnel-soak.XXXXXX")
fi
mkdir -p "$out/bench" "$out/logs"
csv=$out/soak.csv
svg=$out/soak.svg
: >"$out/restarts.txt"

# A free loopback port for the agent's admin endpoint (the agent does not
# print the address it bound, so it cannot be :0). The port is fixed for
# all agent restarts so the sampler keeps one address.
pick_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# State shared with the sampler subshell through files.
set_phase() {
  echo "$1" >"$RT_TMP/phase.tmp"
  mv "$RT_TMP/phase.tmp" "$RT_TMP/phase"
  rt_log "phase: $1"
}

agent_n=0
start_agent() {
  agent_n=$((agent_n + 1))
  rt_agent "agent-$agent_n" "$RT_GW_TUNNEL" "$session" "$RT_ECHO_ADDR" \
    --admin-listen "$agent_admin"
  echo "$RT_AGENT_PID" >"$RT_TMP/agent.pid.tmp"
  mv "$RT_TMP/agent.pid.tmp" "$RT_TMP/agent.pid"
}

# --- sampling -------------------------------------------------------------

now_ms() {
  local us=${EPOCHREALTIME/./}
  echo $((us / 1000))
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

fd_count() {
  local d=/proc/$1/fd n
  [[ -d $d ]] || return 0
  n=$(find "$d" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) || return 0
  echo "$n"
}

# Sums of the given metrics from ADDR's /metrics, comma separated; empty
# fields if the endpoint does not answer.
metric_sums() {
  local addr=$1
  shift
  local body
  body=$(curl -fsS --max-time 1 "http://$addr/metrics" 2>/dev/null) || body=""
  awk -v names="$*" -v have="${body:+1}" '
    BEGIN { n = split(names, nm, " ") }
    { for (i = 1; i <= n; i++) if ($1 == nm[i] || index($1, nm[i] "{") == 1) s[i] += $NF }
    END { for (i = 1; i <= n; i++) printf "%s%s", (i > 1 ? "," : ""), (have ? s[i] + 0 : "") }
  ' <<<"$body"
}

# The TCP tables of PID's network namespace that exist (tcp6 may not).
TCP_TABLES=()
tcp_tables() {
  local f
  TCP_TABLES=()
  for f in "/proc/$1/net/tcp" "/proc/$1/net/tcp6"; do
    if [[ -r $f ]]; then TCP_TABLES+=("$f"); fi
  done
  ((${#TCP_TABLES[@]} > 0))
}

# Sockets in CLOSE_WAIT (state 08) on local port PORT.
close_wait() {
  local pid=$1 port=$2
  tcp_tables "$pid" || return 0
  awk -v p="$(printf '%04X' "$port")" '
    FNR > 1 { split($2, a, ":"); if (a[2] == p && $4 == "08") n++ }
    END { print n + 0 }' "${TCP_TABLES[@]}" 2>/dev/null || true
}

# PID's TCP sockets (by inode, from its fd table) connected to remote
# port PORT: the agent's connections to the backend.
sockets_to() {
  local pid=$1 port=$2 inodes
  tcp_tables "$pid" || return 0
  inodes=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' -printf '%l ' 2>/dev/null |
    tr -cd '0-9 ') || return 0
  awk -v p="$(printf '%04X' "$port")" -v inodes="$inodes" '
    BEGIN { n = split(inodes, l, " "); for (i = 1; i <= n; i++) own[l[i]] = 1; c = 0 }
    FNR > 1 { split($3, a, ":"); if (a[2] == p && ($10 in own)) c++ }
    END { print c }' "${TCP_TABLES[@]}" 2>/dev/null || true
}

CSV_HEAD=t,phase,gw_rss_kib,gw_fds,gw_streams,gw_conns,gw_uplinks,gw_closewait,agent_pid,agent_rss_kib,agent_fds,agent_streams,agent_uplinks,agent_backend

sample_row() {
  local t_ms phase apid gw_m ag_m
  t_ms=$(($(now_ms) - t0_ms))
  phase=$(<"$RT_TMP/phase")
  apid=$(<"$RT_TMP/agent.pid")
  gw_m=$(metric_sums "$RT_GW_ADMIN" ringtunnel_active_streams ringtunnel_gateway_connections ringtunnel_uplinks)
  ag_m=$(metric_sums "$agent_admin" ringtunnel_active_streams ringtunnel_uplinks)
  printf '%d.%d,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n' $((t_ms / 1000)) $((t_ms % 1000 / 100)) "$phase" \
    "$(rss_kib "$RT_GW_PID")" "$(fd_count "$RT_GW_PID")" "$gw_m" \
    "$(close_wait "$RT_GW_PID" "$gw_port")" "$apid" \
    "$(rss_kib "$apid")" "$(fd_count "$apid")" "$ag_m" "$(sockets_to "$apid" "$echo_port")"
}

# Runs in a background subshell until rt_stop/rt_cleanup sends SIGTERM
# (handled between samples; every sample is bounded by curl --max-time 1).
sampler() {
  trap 'exit 0' TERM
  local next left
  next=$(now_ms)
  while :; do
    sample_row >>"$csv" || true
    next=$((next + 1000))
    left=$((next - $(now_ms)))
    ((left > 0)) || { next=$(now_ms); continue; }
    sleep "$((left / 1000)).$(printf '%03d' $((left % 1000)))"
  done
}

# Drops PID (a child that has exited and been waited for) from the list
# rt_cleanup signals, so a recycled PID is never signalled.
forget_pid() {
  local keep=() p
  for p in "${RT_PIDS[@]}"; do
    [[ $p == "$1" ]] || keep+=("$p")
  done
  RT_PIDS=("${keep[@]}")
}

# --- load -----------------------------------------------------------------

bench_pid="" bench_round=0
start_bench_round() {
  local secs=$1 name
  bench_round=$((bench_round + 1))
  name=$(printf 'round-%03d' "$bench_round")
  timeout --kill-after=5 $((secs + 20)) "${RT_BENCH[@]}" "http://$RT_GW_PUBLIC/" \
    --host "$session" --rate "$rate" -c "$conns" -d "${secs}s" --warmup 0s --timeout 5s \
    --json "$out/bench/$name.json" >"$out/bench/$name.txt" 2>&1 &
  bench_pid=$!
  RT_PIDS+=("$bench_pid")
}

# 0 if no bench round is running (reaps a finished one).
bench_idle() {
  [[ -z $bench_pid ]] && return 0
  kill -0 "$bench_pid" 2>/dev/null && return 1
  local rc=0
  wait "$bench_pid" || rc=$?
  ((rc == 0)) || rt_log "bench round $bench_round exited with status $rc (see $out/bench/)"
  forget_pid "$bench_pid"
  bench_pid=""
  return 0
}

wait_bench() {
  while ! bench_idle; do sleep 0.2; done
}

# Waits up to 30 s for a client process that ends on its own deadline.
wait_clients() {
  local pid=$1
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    rt_log "clients (pid $pid) still running 30 s after their deadline; stopping them"
    rt_stop "$pid"
  else
    wait "$pid" || rt_log "clients (pid $pid) exited with status $?"
    forget_pid "$pid"
  fi
}

restart_agent() {
  local sig=$1 old=$RT_AGENT_PID t_start took
  t_start=$(now_ms)
  if [[ $sig == KILL ]]; then
    kill -KILL "$old" 2>/dev/null || true
    { wait "$old"; } 2>/dev/null || true # no "Killed" job notice
    forget_pid "$old"
  else
    # The agent drains on SIGTERM (GOAWAY, in-flight streams finish for up
    # to its --shutdown-grace, 10 s): wait that long before forcing it,
    # as a service manager would.
    kill -TERM "$old" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$old" 2>/dev/null || break
      sleep 0.1
    done
    rt_stop "$old"
  fi
  start_agent
  took=$(($(now_ms) - t_start))
  printf 't=%ss SIG%s old_pid=%s new_pid=%s down_ms=%s\n' \
    $(((t_start - t0_ms) / 1000)) "$sig" "$old" "$RT_AGENT_PID" "$took" | tee -a "$out/restarts.txt" >&2
}

# --- run --------------------------------------------------------------------

rt_echo echo 0
rt_gateway gateway
gw_port=${RT_GW_PUBLIC##*:}
echo_port=${RT_ECHO_ADDR##*:}
agent_admin=127.0.0.1:$(pick_port)
start_agent
rt_log "echo=$RT_ECHO_ADDR gateway=$RT_GW_PUBLIC admin=$RT_GW_ADMIN agent admin=$agent_admin"
rt_log "duration ${duration}s, warm-up ${warmup}s, quiet ${quiet}s, agent restart every ${restart_every}s; output in $out"

t0_ms=$(now_ms)
set_phase warmup
echo "$CSV_HEAD" >"$csv"
sampler &
sampler_pid=$!
RT_PIDS+=("$sampler_pid")

# Warm-up: normal load, complete large bodies, and the two client kinds
# that make the gateway hold large response data (stalled readers,
# cancelled downloads), so that buffers, pools and the allocator's caches
# are at their working size before the baseline is taken. The kinds that
# only send bad input are left for the measured load.
start_bench_round "$warmup"
rt_start warmup-clients timeout --kill-after=5 $((warmup + 30)) python3 "$helper" clients \
  "$RT_GW_PUBLIC" "$session" "$warmup" stalled_reader,cancelled_download
warmup_clients_pid=$RT_LAST_PID
for _ in 1 2 3; do
  curl -sS -o /dev/null --max-time 15 -H "Host: $session" "http://$RT_GW_PUBLIC/bytes/20000000" ||
    rt_log "warm-up download failed"
  head -c 100000 /dev/zero | curl -sS -o /dev/null --max-time 15 -H "Host: $session" \
    --data-binary @- "http://$RT_GW_PUBLIC/echo" || rt_log "warm-up upload failed"
done
wait_bench
wait_clients "$warmup_clients_pid"
cp "$RT_TMP/warmup-clients.out" "$out/warmup-clients.txt"
set_phase baseline
sleep "$quiet"

set_phase load
load_start=$SECONDS
load_end=$((SECONDS + duration))
rt_start clients timeout --kill-after=5 $((duration + 30)) python3 "$helper" clients \
  "$RT_GW_PUBLIC" "$session" "$duration" "$clients"
clients_pid=$RT_LAST_PID

restarts=()
if ((restart_every > 0)); then
  for ((at = restart_every; at * 10 <= duration * 7; at += restart_every)); do
    restarts+=("$at")
  done
fi
kill_at=$((${#restarts[@]} / 2)) # index of the SIGKILL restart
next_restart=0
while ((SECONDS < load_end)); do
  left=$((load_end - SECONDS))
  if bench_idle && ((left >= 2)); then
    start_bench_round $((left < 10 ? left : 10))
  fi
  if ((next_restart < ${#restarts[@]})) &&
    ((SECONDS - load_start >= restarts[next_restart])); then
    if ((next_restart == kill_at)); then restart_agent KILL; else restart_agent TERM; fi
    next_restart=$((next_restart + 1))
  fi
  sleep 0.5
done

set_phase drain
wait_bench
wait_clients "$clients_pid"
cp "$RT_TMP/clients.out" "$out/clients.txt"
set_phase quiet
sleep "$quiet"
sleep 1.2 # one more sample in the quiet phase
rt_stop "$sampler_pid"

# Gateway error counters by kind, summed over cores (whole run).
gw_errors=$(rt_get "$RT_GW_ADMIN" /metrics 2>/dev/null | awk '
  /^ringtunnel_errors_total\{/ && $NF > 0 {
    k = $1; sub(/.*kind="/, "", k); sub(/".*/, "", k); n[k] += $NF }
  END { for (k in n) printf "%s%s=%d", (c++ ? " " : ""), k, n[k] }') || gw_errors="?"

# Stops PID with SIGTERM and reports how long it took to exit (SIGKILL
# after LIMIT seconds).
stop_timed() {
  local pid=$1 limit=$2 t ms
  t=$(now_ms)
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && (($(now_ms) - t < limit * 1000)); do sleep 0.1; done
  ms=$(($(now_ms) - t))
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    echo "did not exit within ${limit} s of SIGTERM; killed"
  else
    echo "exited $((ms / 1000)).$((ms % 1000 / 100)) s after SIGTERM"
  fi
  { wait "$pid"; } 2>/dev/null || true
  forget_pid "$pid"
}
# The gateway's --shutdown-grace is 10 s: with nothing in flight it exits
# at once; waiting out the grace means it still had streams open.
gw_stop=$(stop_timed "$RT_GW_PID" 20)
agent_stop=$(stop_timed "$RT_AGENT_PID" 20)

# --- report -----------------------------------------------------------------

for f in "$RT_TMP"/*.err; do
  cp "$f" "$out/logs/$(basename "$f" .err).log"
done

summary_rc=0
python3 "$helper" report "$csv" "$svg" --rss-pct 20 --rss-min-kib 8192 --fd-tol 4 \
  >"$out/summary.txt" || summary_rc=$?

bench_totals=$(
  for j in "$out"/bench/round-*.json; do
    if [[ -f $j ]]; then rt_json_rows "$j" rows; fi
  done | awk -F'\t' '
    { n++; req += $2; err += $9; p[n] = $6; if ($6 > mx) mx = $6 }
    END {
      if (n == 0) { print "no bench rounds finished"; exit }
      # median of the per-round p99s (insertion sort, n is small)
      for (i = 2; i <= n; i++) { v = p[i]; for (j = i - 1; j > 0 && p[j] > v; j--) p[j + 1] = p[j]; p[j + 1] = v }
      printf "bench: %d rounds (warm-up included), %d requests, %d errors, p99 per round: median %.2f ms, worst %.2f ms\n",
        n, req, err, p[int((n + 1) / 2)], mx
    }'
)

{
  echo
  echo "=== soak summary (load ${duration}s, quiet ${quiet}s) ==="
  cat "$out/summary.txt"
  echo
  echo "$bench_totals"
  echo "  (errors include requests in flight during the agent restarts)"
  echo "misbehaving clients (answers: HTTP status, or no_answer = none within 2 s, closed = EOF/reset):"
  sed 's/^/  /' "$out/clients.txt"
  echo "gateway error counters: ${gw_errors:-none}"
  echo "at the end: gateway $gw_stop (--shutdown-grace 10); agent $agent_stop"
  echo "agent restarts: ${#restarts[@]}$( ((${#restarts[@]})) && echo " (one of them SIGKILL)")"
  sed 's/^/  /' "$out/restarts.txt"
  echo
  echo "csv: $csv"
  echo "svg: $svg"
} | tee "$out/summary-full.txt"

{
  rt_report_head "Soak: ${duration}s mixed load with misbehaving clients and agent restarts" \
    "scripts/soak.sh ${args[*]}"
  rt_fenced <"$out/summary-full.txt"
} >"$out/soak.md"

if ((summary_rc != 0)); then
  rt_die "not flat: some series grew (see $out/summary.txt and $svg)"
fi
rt_log "all series flat"
