#!/usr/bin/env bash
# The HTTPS edge: new TLS connections per second and keep-alive requests
# per second, ringtunnel side by side with nginx terminating TLS with the
# same certificate, CPU per request per process from /proc. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/https-bench.sh [options]

Targets, loaded one after the other with the same wrk load (-t1):
  ringtunnel-https  gateway --https-listen + agent, in front of the echo backend
  ringtunnel-http   the same gateway's plain --listen (what TLS adds)
  nginx-https       nginx terminating TLS with the same certificate and
                    key, proxying to the same echo (upstream keep-alive;
                    Debian's nginx-light, installed if missing, run from a
                    temp dir as our own process, one worker per core)

Cases:
  close  a new TLS connection per request (wrk -H "Connection: close"):
         handshakes per second, and per gateway/nginx core
  ka     keep-alive requests per second

The certificate is an ECDSA P-256 leaf of a throw-away CA (openssl); wrk
does not resume TLS sessions, so every "close" request is a full
handshake. Per target and case it prints requests/s, p50 and p99, and CPU
microseconds per request for each process (utime+stime from /proc/PID/stat
over the run / requests), as the median over --runs runs with the range.

Options:
  --conns-close N   wrk connections for "close" (default 20)
  --conns-ka N      wrk connections for "ka" (default 50)
  --duration D      measured time per run (default 5s)
  --runs N          runs per target and case (default 1)
  --cores N         --cores for gateway and agent, nginx workers (default 1)
  --driver D        auto|uring|legacy (default auto)
  --out DIR         output directory (default results/)
  -h, --help        this text
EOF
}

conns_close=20 conns_ka=50 duration=5s runs=1 cores=1 driver=auto out=""
while (($#)); do
  case $1 in
    --conns-close) rt_need_arg "$@"; conns_close=$2; shift 2 ;;
    --conns-ka) rt_need_arg "$@"; conns_ka=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --driver) rt_need_arg "$@"; driver=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init https-bench
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/https-bench.md

rt_apt_install wrk:wrk nginx:nginx-light openssl:openssl

secs=$(rt_secs "$duration")
tck=$(rt_clk_tck)
rows=$RT_TMP/rows.tsv
: >"$rows"

# One certificate for both servers.
pki=$RT_TMP/pki
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench \
  -addext "subjectAltName=DNS:bench,DNS:*.tunnel.test" \
  -keyout "$pki/leaf.key" -out "$pki/leaf.csr" 2>/dev/null
openssl x509 -req -in "$pki/leaf.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -days 2 \
  -copy_extensions copy -out "$pki/leaf.pem" 2>/dev/null

# utime+stime (ticks) of a role, or of nginx's master and workers.
pid_ticks() {
  if [[ $1 == nginx ]]; then rt_tree_ticks "$NGINX_PID"; else rt_cpu_ticks "$1"; fi
}

# wrk_run MODE CONNS URL OUTFILE: prints "requests rps p50_ms p99_ms errors".
wrk_run() {
  local mode=$1 c=$2 url=$3 outf=$4 hdr=() stats
  [[ $mode == close ]] && hdr=(-H "Connection: close")
  rt_run_bounded $((secs + 30)) "$outf" wrk -t1 -c "$c" -d "$duration" --latency \
    -H "Host: bench" "${hdr[@]}" "$url" || true
  stats=$(rt_wrk_stats "$outf")
  [[ -n $stats ]] || return 0
  echo "$stats $(awk '/Socket errors/ { gsub(",", ""); e = $4 + $6 + $8 + $10 }
    /Non-2xx/ { e += $NF } END { print e + 0 }' "$outf")"
}

role_args=(--driver "$driver" --cores "$cores")
rt_echo echo 0 --driver "$driver" --cores "$cores"
echo_pid=$RT_ECHO_PID echo_addr=$RT_ECHO_ADDR
rt_gateway gw "${role_args[@]}" --https-listen 127.0.0.1:0 \
  --https-cert "$pki/leaf.pem" --https-key "$pki/leaf.key"
gw_pid=$RT_GW_PID gw_public=$RT_GW_PUBLIC
gw_https=$(rt_field "$RT_READY" https)
rt_agent agent "$RT_GW_TUNNEL" bench "$echo_addr" "${role_args[@]}"
ag_pid=$RT_AGENT_PID
rt_nginx_proxy "$echo_addr" "$cores" "$pki/leaf.pem" "$pki/leaf.key"
for ((i = 0; i < 100; i++)); do
  curl -fsSk --max-time 1 -o /dev/null -H "Host: bench" "https://$gw_https/" 2>/dev/null && break
  sleep 0.05
done

for mode in close ka; do
  c=$conns_close
  [[ $mode == ka ]] && c=$conns_ka
  for ((r = 1; r <= runs; r++)); do
    for target in ringtunnel-https ringtunnel-http nginx-https; do
      case $target in
        ringtunnel-https) url=https://$gw_https/ pids=("$gw_pid" "$ag_pid" "$echo_pid") names=(gateway agent echo) ;;
        ringtunnel-http) url=http://$gw_public/ pids=("$gw_pid" "$ag_pid" "$echo_pid") names=(gateway agent echo) ;;
        nginx-https) url=https://$NGINX_ADDR/ pids=(nginx "$echo_pid") names=(nginx echo) ;;
      esac
      rt_log "$mode c=$c $target run $r"
      before=()
      for p in "${pids[@]}"; do before+=("$(pid_ticks "$p")"); done
      res=$(wrk_run "$mode" "$c" "$url" "$RT_TMP/$mode-$target-$r.txt")
      i=0
      for p in "${pids[@]}"; do
        t1=$(pid_ticks "$p")
        [[ -n $res ]] && printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode:$c" "$target" "$r" "$res" \
          "${names[$i]}" $((t1 - before[i])) >>"$rows"
        i=$((i + 1))
      done
      [[ -z $res ]] && rt_log "no result: $target $mode run $r"
    done
  done
done

summary=$(python3 - "$rows" "$tck" "$cores" <<'PY'
import statistics as st, sys
tck, cores = float(sys.argv[2]), int(sys.argv[3])
runs = {}
for line in open(sys.argv[1]):
    case, target, run, res, proc, ticks = line.rstrip("\n").split("\t")
    req, rps, p50, p99, err = res.split()
    r = runs.setdefault((case, target), {}).setdefault(run, {
        "rps": float(rps), "p50": float(p50), "p99": float(p99), "err": int(err), "cpu": {}})
    r["cpu"][proc] = float(ticks) / tck * 1e6 / float(req)

def med(v, d=1):
    return f"{st.median(v):.{d}f}" if len(v) == 1 else f"{st.median(v):.{d}f} [{min(v):.{d}f}-{max(v):.{d}f}]"

print("| case | target | req/s | req/s per core | p50 ms | p99 ms | errors | CPU us/req per process |")
print("|---|---|---:|---:|---:|---:|---:|---|")
base = {}
for (case, target), rs in runs.items():
    v = list(rs.values())
    rps = [x["rps"] for x in v]
    if target == "nginx-https":
        base[case] = st.median(rps)
    cpu = "; ".join(f"{p} {med([x['cpu'][p] for x in v])}" for p in v[0]["cpu"])
    print(f"| {case} | {target} | {med(rps, 0)} | {st.median(rps) / cores:.0f} | "
          f"{med([x['p50'] for x in v], 2)} | {med([x['p99'] for x in v], 2)} | "
          f"{sum(x['err'] for x in v)} | {cpu} |")
print()
for (case, target), rs in runs.items():
    if target == "ringtunnel-https" and case in base:
        rps = st.median([x["rps"] for x in rs.values()])
        print(f"{case}: ringtunnel-https / nginx-https req/s = {rps / base[case]:.2f}")
PY
)
echo "$summary"
{
  rt_report_head "HTTPS edge: ringtunnel vs nginx terminating TLS" \
    "scripts/https-bench.sh --conns-close $conns_close --conns-ka $conns_ka --duration $duration --runs $runs --cores $cores --driver $driver"
  echo "$summary"
  echo
} >"$report"
rt_log "wrote $(rt_rel "$report")"
