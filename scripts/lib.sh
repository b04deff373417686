# shellcheck shell=bash
# shellcheck disable=SC2034 # RT_* results are read by the sourcing scripts
# Shared helpers for scripts/*.sh and perf/*.sh. Source it, do not run it.
#
# What it gives:
#   rt_init NAME          strict mode, temp dir, EXIT/INT/TERM trap, fd limit
#   rt_bin                sets RT_BIN (builds the release binary if missing)
#                         and RT_BENCH (the bench command prefix)
#   rt_start NAME CMD..   starts CMD in the background, logs in the temp dir,
#                         remembers its PID (RT_LAST_PID) for cleanup
#   rt_stop PID           ends one of those processes early (TERM, then KILL)
#   rt_wait_ready NAME PREFIX [SECS]
#                         polls NAME's stdout for a line starting with PREFIX,
#                         sets RT_READY to it; fails if NAME dies or times out
#   rt_field LINE KEY     prints VALUE of "KEY=VALUE" in LINE
#   rt_echo / rt_gateway / rt_agent
#                         start one role and wait for its ready line
#   rt_run_bounded SECS OUT CMD..
#                         runs CMD (stdout to OUT) under `timeout`, tracked,
#                         so a signal to the script still ends it
#   rt_get ADDR PATH      HTTP GET from an admin endpoint
#   rt_metric_sum ADDR NAME   sum of a Prometheus metric over its labels
#   rt_cpu_ticks PID      utime+stime of PID in clock ticks
#   rt_tree_ticks PID     the same, summed over PID and its children (nginx)
#   rt_apt_install CMD:PKG..  installs (Debian) the PKGs whose CMD is missing
#   rt_free_port          a free TCP port on 127.0.0.1
#   rt_nginx_proxy UPSTREAM WORKERS [CERT KEY]
#                         runs nginx as a reverse proxy to UPSTREAM (upstream
#                         keep-alive, HTTP/1.1), terminating TLS with CERT
#                         and KEY if given; sets NGINX_ADDR and NGINX_PID
#   rt_wrk_stats FILE     "requests rps p50_ms p99_ms" of a wrk --latency
#                         output (nothing if it has no result)
#   rt_machine_facts      nproc, kernel, CPU, date, rustc, git revision
#   rt_secs DURATION      "500ms" / "10s" / "2m" / "7" -> whole seconds (ceil)
#
# Processes are only ever ended by the PIDs this file recorded when it
# started them: never by name.
#
# Environment:
#   RINGTUNNEL_BIN   use this binary instead of target/release/ringtunnel
#   RT_BUILD=1       run `cargo build --release` even if the binary exists
#   RT_WAIT_QUIET=S  wait up to S seconds for the cores to be >= 90% idle
#                    before starting (shared machines)
#   RT_KEEP_TMP=1    keep the temp dir with every role's stdout/stderr
#   RUST_LOG         log filter for the roles (default: info; bench: warn)

RT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RT_PIDS=()
RT_TMP=""
RT_NAME="rt"
RT_BIN=""
RT_BENCH=()
RT_READY=""
RT_LAST_PID=""
RT_LOADAVG=""

rt_log() { printf '[%s] %s\n' "$RT_NAME" "$*" >&2; }
rt_die() {
  rt_log "error: $*"
  exit 1
}

rt_init() {
  RT_NAME=$1
  set -euo pipefail
  RT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/ringtunnel-${RT_NAME}.XXXXXX")
  trap rt_cleanup EXIT
  trap 'rt_log "interrupted"; exit 130' INT
  trap 'rt_log "terminated"; exit 143' TERM
  if [[ -n ${RT_WAIT_QUIET:-} ]]; then rt_wait_quiet "$RT_WAIT_QUIET"; fi
  RT_LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
  local busy
  busy=$(awk -v n="$(nproc)" '{ print ($1 > n / 2) ? 1 : 0 }' /proc/loadavg)
  if ((busy)); then
    rt_log "warning: load average $RT_LOADAVG on $(nproc) cores: other work is running; results will be noisy"
  fi
  # c=1000 with --compare needs ~4k descriptors in the backend alone.
  local soft hard
  soft=$(ulimit -Sn)
  hard=$(ulimit -Hn)
  if [[ $soft != unlimited && $soft -lt 16384 ]]; then
    if [[ $hard == unlimited || $hard -ge 16384 ]]; then
      ulimit -Sn 16384
    else
      ulimit -Sn "$hard"
      rt_log "warning: open files limited to $hard; c=1000 runs may fail to connect"
    fi
  fi
}

# Percent of CPU time idle over the next 2 seconds, all cores.
rt_idle_pct() {
  local a b
  a=$(awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  sleep 2
  b=$(awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    t = y[2] - x[2]; printf "%d\n", (t > 0 ? 100 * (y[1] - x[1]) / t : 100) }'
}

# Waits up to SECS for the cores to be >= 90% idle (other people's builds
# and benchmarks skew results); goes ahead with a warning after that.
rt_wait_quiet() {
  local secs=$1 deadline idle
  deadline=$((SECONDS + secs))
  while :; do
    idle=$(rt_idle_pct)
    ((idle >= 90)) && return 0
    if ((SECONDS >= deadline)); then
      rt_log "warning: machine still busy (${idle}% idle) after ${secs}s; going ahead"
      return 0
    fi
    rt_log "machine busy (${idle}% idle); waiting for it to quieten (RT_WAIT_QUIET=$secs)"
    sleep 8
  done
}

# Ends every process we started, newest first: SIGTERM, up to 5 s grace,
# then SIGKILL for whatever is left. Only PIDs in RT_PIDS.
rt_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local i pid alive
  for ((i = ${#RT_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${RT_PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${RT_PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${RT_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      rt_log "pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n $RT_TMP && -d $RT_TMP ]]; then
    if [[ ${RT_KEEP_TMP:-0} == 1 || $rc -ne 0 ]]; then
      rt_log "role logs kept in $RT_TMP"
    else
      rm -rf "$RT_TMP"
    fi
  fi
  exit "$rc"
}

# Ends one process we started (SIGTERM, 5 s grace, SIGKILL) and forgets it.
rt_stop() {
  local pid=$1 keep=() p
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    rt_log "pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  for p in "${RT_PIDS[@]}"; do
    [[ $p == "$pid" ]] || keep+=("$p")
  done
  RT_PIDS=("${keep[@]}")
}

rt_bin() {
  if [[ -n ${RINGTUNNEL_BIN:-} ]]; then
    [[ -x $RINGTUNNEL_BIN ]] || rt_die "RINGTUNNEL_BIN=$RINGTUNNEL_BIN is not executable"
    RT_BIN=$RINGTUNNEL_BIN
    rt_set_bench
    return
  fi
  local target=${CARGO_TARGET_DIR:-$RT_ROOT/target}
  RT_BIN=$target/release/ringtunnel
  if [[ ! -x $RT_BIN || ${RT_BUILD:-0} == 1 ]]; then
    rt_log "building the release binary (cargo build --release)"
    (cd "$RT_ROOT" && cargo build --release --bin ringtunnel) >&2 ||
      rt_die "cargo build --release failed"
  fi
  rt_set_bench
}

# RT_BENCH: the bench command prefix; its log is quiet by default so the
# tables stay readable (RT_BENCH_LOG overrides).
rt_set_bench() {
  RT_BENCH=(env "RUST_LOG=${RT_BENCH_LOG:-warn}" "$RT_BIN" bench)
}

rt_start() {
  local name=$1
  shift
  "$@" >"$RT_TMP/$name.out" 2>"$RT_TMP/$name.err" &
  RT_LAST_PID=$!
  RT_PIDS+=("$RT_LAST_PID")
}

rt_show_log() {
  local name=$1
  rt_log "--- last lines of $name stderr ---"
  tail -n 20 "$RT_TMP/$name.err" >&2 2>/dev/null || true
}

rt_wait_ready() {
  local name=$1 prefix=$2 secs=${3:-20}
  local pid=$RT_LAST_PID
  local deadline=$((SECONDS + secs))
  RT_READY=""
  while ((SECONDS < deadline)); do
    RT_READY=$(grep -m1 "^$prefix" "$RT_TMP/$name.out" 2>/dev/null || true)
    if [[ -n $RT_READY ]]; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rt_show_log "$name"
      rt_die "$name (pid $pid) exited before printing '$prefix'"
    fi
    sleep 0.05
  done
  rt_show_log "$name"
  rt_die "$name (pid $pid) printed no '$prefix' line within ${secs}s"
}

rt_field() {
  local line=$1 key=$2 word
  for word in $line; do
    if [[ $word == "$key="* ]]; then
      printf '%s\n' "${word#"$key="}"
      return 0
    fi
  done
  return 1
}

# rt_echo NAME DELAY_MS [extra echo flags..] -> RT_ECHO_ADDR, RT_ECHO_PID
rt_echo() {
  local name=$1 delay=$2
  shift 2
  rt_start "$name" env RUST_LOG="${RUST_LOG:-info}" "$RT_BIN" echo \
    --listen 127.0.0.1:0 --delay-ms "$delay" "$@"
  RT_ECHO_PID=$RT_LAST_PID
  rt_wait_ready "$name" "ringtunnel echo ready"
  RT_ECHO_ADDR=$(rt_field "$RT_READY" listen)
}

# rt_gateway NAME [extra gateway flags..] -> RT_GW_PUBLIC, RT_GW_TUNNEL,
# RT_GW_ADMIN, RT_GW_PID
rt_gateway() {
  local name=$1
  shift
  rt_start "$name" env RUST_LOG="${RUST_LOG:-info}" "$RT_BIN" gateway \
    --listen 127.0.0.1:0 --tunnel-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 "$@"
  RT_GW_PID=$RT_LAST_PID
  rt_wait_ready "$name" "ringtunnel gateway ready"
  RT_GW_PUBLIC=$(rt_field "$RT_READY" public)
  RT_GW_TUNNEL=$(rt_field "$RT_READY" tunnel)
  RT_GW_ADMIN=$(rt_field "$RT_READY" admin)
}

# rt_agent NAME TUNNEL SESSION BACKEND [extra agent flags..] -> RT_AGENT_PID
rt_agent() {
  local name=$1 tunnel=$2 session=$3 backend=$4
  shift 4
  rt_start "$name" env RUST_LOG="${RUST_LOG:-info}" "$RT_BIN" agent \
    --gateway "$tunnel" --session "$session" --to "$backend" --quiet "$@"
  RT_AGENT_PID=$RT_LAST_PID
  rt_wait_ready "$name" "ringtunnel agent ready"
}

# Runs a command with a hard time bound. Its stdout goes to OUT (and is
# printed afterwards), stderr passes through. Returns the command's status
# (124 on timeout).
rt_run_bounded() {
  local secs=$1 out=$2
  shift 2
  timeout --kill-after=5 "$secs" "$@" >"$out" &
  local pid=$!
  RT_PIDS+=("$pid")
  local rc=0
  wait "$pid" || rc=$?
  if ((rc == 124)); then rt_log "command timed out after ${secs}s: $*"; fi
  return "$rc"
}


rt_get() {
  local addr=$1 path=$2
  curl -fsS --max-time 5 "http://$addr$path"
}

rt_metric_sum() {
  local addr=$1 name=$2
  rt_get "$addr" /metrics | awk -v n="$name" '
    $1 == n || index($1, n "{") == 1 { s += $NF }
    END { printf "%.0f\n", s }'
}

# utime + stime (fields 14 and 15 of /proc/PID/stat, counted after the
# command name, which may contain spaces).
rt_cpu_ticks() {
  local pid=$1 stat rest
  local -a f
  stat=$(<"/proc/$pid/stat")
  rest=${stat##*) }
  # rest starts at field 3 (state): utime is field 14 -> index 11.
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

rt_tree_ticks() {
  local pid total=0 t
  for pid in "$1" $(pgrep -P "$1" 2>/dev/null); do
    [[ -r /proc/$pid/stat ]] || continue
    t=$(rt_cpu_ticks "$pid") || continue
    total=$((total + t))
  done
  echo "$total"
}

rt_apt_install() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  ((${#need[@]})) || return 0
  rt_log "installing ${need[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
}

rt_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

rt_nginx_proxy() {
  local upstream=$1 workers=$2 cert=${3:-} key=${4:-} dir=$RT_TMP/nginx port scheme=http
  local tls="" i
  mkdir -p "$dir/logs"
  port=$(rt_free_port)
  if [[ -n $cert ]]; then
    scheme=https
    tls="ssl_certificate $cert; ssl_certificate_key $key; ssl_protocols TLSv1.2 TLSv1.3;"
  fi
  cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  upstream echo { server $upstream; keepalive 256; }
  server {
    listen 127.0.0.1:$port ${cert:+ssl }reuseport backlog=4096;
    $tls
    keepalive_requests 1000000;
    location / {
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_buffering off;
    }
  }
}
EOF
  rt_start nginx nginx -p "$dir" -c "$dir/nginx.conf"
  NGINX_PID=$RT_LAST_PID
  NGINX_ADDR=127.0.0.1:$port
  for ((i = 0; i < 100; i++)); do
    curl -fsSk --max-time 1 -o /dev/null "$scheme://$NGINX_ADDR/" 2>/dev/null && return 0
    sleep 0.05
  done
  rt_die "nginx did not start (see $dir/logs/error.log)"
}

rt_wrk_stats() {
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
    /requests in/ { req = $1 } /^Requests\/sec:/ { rps = $2 }
    END { if (req > 0) printf "%d %.1f %.3f %.3f\n", req, rps, p50, p99 }' "$1"
}

rt_clk_tck() { getconf CLK_TCK; }

rt_secs() {
  local d=$1
  case $d in
    *ms) echo $(((${d%ms} + 999) / 1000)) ;;
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *) echo "$d" ;;
  esac
}

# Text with the repo root removed from paths, for files that get shared.
rt_rel() {
  local t=$1
  printf '%s\n' "${t//"$RT_ROOT/"/}"
}

# Number of comma-separated items.
rt_count_list() {
  local IFS=,
  # shellcheck disable=SC2206
  local a=($1)
  echo "${#a[@]}"
}

rt_machine_facts() {
  local cpu
  cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- nproc: $(nproc)"
  echo "- cpu: ${cpu:-unknown}"
  echo "- kernel: $(uname -sr)"
  echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "- load average before the run: $RT_LOADAVG (1/5/15 min; anything well above 0 means other work shared the cores)"
  echo "- rustc: $(rustc --version 2>/dev/null || echo unknown)"
  local rev
  rev=$(cd "$RT_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n ${RINGTUNNEL_BIN:-} ]]; then
    echo "- ringtunnel: a given binary (RINGTUNNEL_BIN, $(basename "$RINGTUNNEL_BIN")); the repo is at $rev"
  else
    echo "- ringtunnel: $rev$(cd "$RT_ROOT" && git diff --quiet HEAD -- src 2>/dev/null || echo ' (+ uncommitted changes in src/)')"
  fi
}

# Frames per writev per gateway core, from /stats.
rt_fpw_summary() {
  local addr=$1 json
  json=$(rt_get "$addr" /stats) || return 1
  if command -v jq >/dev/null; then
    jq -r '.cores[] | "core \(.core): frames/writev mean \(.frames_per_writev.mean) p50 \(.frames_per_writev.p50) p99 \(.frames_per_writev.p99) max \(.frames_per_writev.max) (writevs \(.frames_per_writev.count), KiB/writev mean \(.kib_per_writev.mean))"' <<<"$json"
  elif command -v python3 >/dev/null; then
    python3 -c '
import json, sys
for c in json.load(sys.stdin)["cores"]:
    f = c["frames_per_writev"]
    print("core %s: frames/writev mean %s p50 %s p99 %s max %s (writevs %s)" % (c["core"], f["mean"], f["p50"], f["p99"], f["max"], f["count"]))
' <<<"$json"
  else
    printf '%s\n' "$json"
  fi
}

# Rows of a bench --json file as tab-separated fields:
#   label requests rps p50 p90 p99 p99.9 max errors_total mean
# SECTION is "rows" (the URL) or "compare" (the --compare URL).
rt_json_rows() {
  local file=$1 section=${2:-rows}
  if command -v jq >/dev/null; then
    jq -r --arg s "$section" '(.[$s] // [])[] | [.label, .requests, .rps,
      .latency_ms.p50, .latency_ms.p90, .latency_ms.p99, .latency_ms.p99_9,
      .latency_ms.max, .errors.total, .latency_ms.mean] | @tsv' "$file"
  elif command -v python3 >/dev/null; then
    python3 - "$file" "$section" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d.get(sys.argv[2]) or []:
    l = r["latency_ms"]
    print("\t".join(str(x) for x in [r["label"], r["requests"], r["rps"], l["p50"],
        l["p90"], l["p99"], l["p99_9"], l["max"], r["errors"]["total"], l["mean"]]))
PY
  else
    rt_die "need jq or python3 to read $file"
  fi
}

# Sum of errors.total over all rows (both sections).
rt_json_errors() {
  { rt_json_rows "$1" rows; rt_json_rows "$1" compare; } | awk -F'\t' '{ s += $9 } END { print s + 0 }'
}

# "--flag value" parsing helper: fails clearly when the value is missing.
rt_need_arg() {
  [[ $# -ge 2 && -n $2 ]] || rt_die "$1 needs a value (see --help)"
}

# rt_report_head TITLE CMD...: the top of a results .md: the title, the
# commands that produced it (machine paths made relative) in a code
# block, then the machine facts.
rt_report_head() {
  local title=$1 c
  shift
  echo "# $title"
  echo
  echo '```'
  for c in "$@"; do rt_rel "$c"; done
  echo '```'
  echo
  rt_machine_facts
  echo
}

# rt_fenced: standard input as a code block, then a blank line.
rt_fenced() {
  echo '```'
  cat
  echo '```'
  echo
}

# rt_ab_bench MODE LABEL A_PUBLIC B_PUBLIC: one open-loop `bench --compare`
# of gateway A against gateway B (both serving session "demo") in MODE
# (keepalive, or close: a new connection per request at $close_rate).
# Reads the caller's rate, close_rate, conns, duration, base and bound;
# appends the raw tables to $base.txt under "## MODE (LABEL)", prints them,
# dies if bench fails. Sets AB_RATE (the rate used) and AB_JSON (its
# --json file, with "rows" for A and "compare" for B).
rt_ab_bench() {
  local mode=$1 label=$2 a=$3 b=$4
  local extra=()
  AB_RATE=$rate
  if [[ $mode == close ]]; then
    AB_RATE=$close_rate
    extra=(--no-keepalive)
  fi
  AB_JSON=$base-$mode.json
  local args=("http://$a/" --host demo --compare "http://$b/"
    --rate "$AB_RATE" -c "$conns" -d "$duration" --warmup 1s --json "$AB_JSON" "${extra[@]}")
  rt_log "$mode: ringtunnel bench ${args[*]}"
  local rc=0
  rt_run_bounded "$bound" "$RT_TMP/bench.out" "${RT_BENCH[@]}" "${args[@]}" || rc=$?
  { echo "## $mode ($label)"; cat "$RT_TMP/bench.out"; echo; } >>"$base.txt"
  cat "$RT_TMP/bench.out"
  ((rc == 0)) || rt_die "bench failed ($mode, exit $rc)"
}
