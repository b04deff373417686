#!/usr/bin/env bash
# What TLS on the uplink costs: the same load through a plaintext uplink and
# a TLS uplink, alternating, in one invocation. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/tls-cost.sh [options]

Starts echo (with a delay) and, per case, a fresh gateway + agent on
127.0.0.1: once with a plaintext uplink, once with TLS (a self-signed CA
and a certificate for 127.0.0.1 made with openssl in the temp dir;
installed from Debian if missing). Runs `ringtunnel bench -c C` through
the tunnel for each concurrency, plain and TLS alternating, --runs times.

Per case it prints requests/s, p50 and p99 (from bench) and CPU per
request of the gateway and of the agent separately (utime+stime from
/proc/PID/stat over the measured run, divided by the requests), then the
TLS/plain ratio of each median.

Options:
  --delay-ms MS    backend delay (default 35, the reference backend)
  --conns LIST     concurrencies (default 100,1000)
  --duration D     measured time per case (default 10s)
  --runs N         repetitions of each case (default 3); medians reported
  --cores N        --cores for echo, gateway and agent (default: all)
  --out DIR        output directory (default results/)
  -h, --help       this text
EOF
}

delay=35 conns=100,1000 duration=10s runs=3 cores="" out=""
while (($#)); do
  case $1 in
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init tls-cost
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/tls-cost-${delay}ms.md
core_args=()
[[ -n $cores ]] && core_args=(--cores "$cores")

if ! command -v openssl >/dev/null 2>&1; then
  rt_log "installing openssl (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi

# A CA and a server certificate for 127.0.0.1 (the agent verifies the IP).
pki=$RT_TMP/pki
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" -days 2 -subj /CN=tls-cost-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$pki/gw.key" -out "$pki/gw.csr" -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$pki/ext"
openssl x509 -req -in "$pki/gw.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
  -CAcreateserial -out "$pki/gw.pem" -days 2 -extfile "$pki/ext" 2>/dev/null

rt_echo echo "$delay" "${core_args[@]}"
secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)
results=$RT_TMP/results.tsv
: >"$results"

# one_case MODE C RUN: fresh gateway + agent, one bench run, one TSV row.
one_case() {
  local mode=$1 c=$2 run=$3
  local gw_tls=() ag_tls=()
  if [[ $mode == tls ]]; then
    gw_tls=(--tunnel-tls-cert "$pki/gw.pem" --tunnel-tls-key "$pki/gw.key")
    ag_tls=(--ca "$pki/ca.pem")
  fi
  rt_gateway "gw-$mode-$c-$run" "${core_args[@]}" "${gw_tls[@]}"
  local gw_pid=$RT_GW_PID public=$RT_GW_PUBLIC
  rt_agent "agent-$mode-$c-$run" "$RT_GW_TUNNEL" bench "$RT_ECHO_ADDR" "${core_args[@]}" "${ag_tls[@]}"
  local ag_pid=$RT_AGENT_PID
  # Warm-up (pools, windows), unmeasured.
  rt_run_bounded 60 "$RT_TMP/warm.txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
    -c "$c" -d 1s --warmup 0s || true
  local g0 a0 g1 a1
  g0=$(rt_cpu_ticks "$gw_pid")
  a0=$(rt_cpu_ticks "$ag_pid")
  local txt=$RT_TMP/bench-$mode-$c-$run.txt
  rt_run_bounded $((secs + 60)) "$txt" "${RT_BENCH[@]}" "http://$public/" --host bench \
    -c "$c" -d "$duration" --warmup 0s || true
  g1=$(rt_cpu_ticks "$gw_pid")
  a1=$(rt_cpu_ticks "$ag_pid")
  rt_stop "$ag_pid"
  rt_stop "$gw_pid"
  # bench prints: label requests RPS p50 p90 p99 ...
  awk -v m="$mode" -v c="$c" -v r="$run" -v g=$((g1 - g0)) -v a=$((a1 - a0)) -v t="$tck" '
    $1 ~ /^c=/ && $2 > 0 {
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%.1f\t%s\n", m, c, r, $2, $3, $4, $6, g / t * 1e6 / $2, a / t * 1e6 / $2, $NF
    }' "$txt" >>"$results"
}

IFS=, read -r -a clist <<<"$conns"
for c in "${clist[@]}"; do
  for ((r = 1; r <= runs; r++)); do
    one_case plain "$c" "$r"
    one_case tls "$c" "$r"
  done
done

summary=$(python3 - "$results" <<'PY'
import statistics as st, sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
by = {}
for mode, c, run, req, rps, p50, p99, gw, ag, err in rows:
    by.setdefault((int(c), mode), []).append((float(rps), float(p50), float(gw), float(ag), err, float(p99)))
print("mode   c     runs  RPS(med)   p50 ms  p99 ms  gw CPU us/req (med, range)   agent CPU us/req (med, range)")
med = {}
for (c, mode), v in sorted(by.items()):
    rps = st.median(x[0] for x in v); p50 = st.median(x[1] for x in v); p99 = st.median(x[5] for x in v)
    gw = [x[2] for x in v]; ag = [x[3] for x in v]
    med[(c, mode)] = (rps, st.median(gw), st.median(ag))
    print(f"{mode:6} {c:<5} {len(v):<5} {rps:<10.0f} {p50:<7.2f} {p99:<7.2f} {st.median(gw):.1f} [{min(gw):.1f}-{max(gw):.1f}]{'':10} {st.median(ag):.1f} [{min(ag):.1f}-{max(ag):.1f}]")
print()
for c in sorted({k[0] for k in med}):
    if (c, "plain") in med and (c, "tls") in med:
        p, t = med[(c, "plain")], med[(c, "tls")]
        print(f"c={c}: TLS/plain  RPS {t[0]/p[0]:.2f}x  gateway CPU/req {t[1]/p[1]:.2f}x  agent CPU/req {t[2]/p[2]:.2f}x")
PY
)
echo "$summary"
{
  echo "# TLS uplink cost, ${delay} ms backend"
  echo
  rt_machine_facts
  echo
  echo "Command: scripts/tls-cost.sh --delay-ms $delay --conns $conns --duration $duration --runs $runs"
  echo
  rt_fenced <<<"$summary"
} >"$report"
rt_log "wrote $(rt_rel "$report")"
