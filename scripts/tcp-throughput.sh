#!/usr/bin/env bash
# TCP tunnel throughput: bulk bytes through a raw TCP tunnel versus the same
# transfer straight to the local service, in one run. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: scripts/tcp-throughput.sh [options]

Starts a local TCP service (a small Python sink/source), a gateway with
--tcp-ports and an agent with --tcp for it, all on 127.0.0.1, then moves
--mib MiB per transfer, alternating direct (client -> service) and
tunnelled (client -> gateway port -> agent -> service), --runs times each,
in both directions:

  upload    the client sends, the service counts and answers the count
  download  the service sends, the client reads to EOF

Prints MiB/s per case (median of the runs), the tunnel/direct ratio, and
the CPU the gateway and the agent spent per MiB moved (utime+stime from
/proc/PID/stat over the tunnelled runs). The client and the service are
Python with 1 MiB buffers: the direct figure is bounded by them too, so
the ratio understates the tunnel rather than flattering it.

Options:
  --mib N        MiB per transfer (default 1024)
  --runs N       runs per case (default 3)
  --cores N      --cores for gateway and agent (default: all)
  --out DIR      output directory (default results/)
  -h, --help     this text
EOF
}

mib=1024 runs=3 cores="" out=""
while (($#)); do
  case $1 in
    --mib) rt_need_arg "$@"; mib=$2; shift 2 ;;
    --runs) rt_need_arg "$@"; runs=$2; shift 2 ;;
    --cores) rt_need_arg "$@"; cores=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

rt_init tcp-throughput
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
report=$out/tcp-throughput.md
core_args=()
[[ -n $cores ]] && core_args=(--cores "$cores")

# The service and the client, one Python file with two modes.
py=$RT_TMP/bulk.py
cat >"$py" <<'PY'
import socket, sys, threading, time
BUF = bytes(1 << 20)

def send_n(c, n):
    while n > 0:
        k = min(n, len(BUF))
        c.sendall(BUF[:k])
        n -= k

def drain(c):
    n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            return n
        n += len(d)

def header(c):
    # The mode line, padded to 32 bytes, however the reads cut it.
    b = b""
    while len(b) < 32:
        d = c.recv(32 - len(b))
        if not d:
            break
        b += d
    return b.split(b"\n")[0].split()

def serve(port_file):
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(64)
    open(port_file, "w").write(str(l.getsockname()[1]))
    def one(c):
        mode = header(c)
        if mode[0] == b"up":
            c.sendall(b"%d\n" % drain(c))
        else:
            send_n(c, int(mode[1]))
        c.close()
    while True:
        c, _ = l.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()

def client(port, mode, mib):
    n = mib << 20
    c = socket.create_connection(("127.0.0.1", port))
    t = time.monotonic()
    if mode == "up":
        c.sendall(b"up\n".ljust(32))
        send_n(c, n)
        c.shutdown(socket.SHUT_WR)
        got = int(c.makefile().readline())
    else:
        c.sendall((b"down %d\n" % n).ljust(32))
        got = drain(c)
    secs = time.monotonic() - t
    if got != n:
        sys.exit("moved %d of %d bytes" % (got, n))
    print("%.1f" % (mib / secs))

if sys.argv[1] == "serve":
    serve(sys.argv[2])
else:
    client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
PY

rt_start service python3 "$py" serve "$RT_TMP/service.port"
for _ in $(seq 100); do [[ -s $RT_TMP/service.port ]] && break; sleep 0.05; done
service_port=$(<"$RT_TMP/service.port")

# A free port for the tunnel: the kernel picks one, we give it back.
tunnel_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rt_gateway gateway --tcp-ports "$tunnel_port" "${core_args[@]}"
rt_start agent env RUST_LOG="${RUST_LOG:-info}" "$RT_BIN" agent --gateway "$RT_GW_TUNNEL" \
  --session bulk --tcp "$service_port=$tunnel_port" "${core_args[@]}"
RT_AGENT_PID=$RT_LAST_PID
rt_wait_ready agent "ringtunnel agent ready"
sleep 0.2

results=$RT_TMP/results.tsv
: >"$results"
tunnel_ticks=0
for mode in up down; do
  for run in $(seq "$runs"); do
    for path in direct tunnel; do
      port=$service_port
      [[ $path == tunnel ]] && port=$tunnel_port
      g0=$(rt_cpu_ticks "$RT_GW_PID")
      a0=$(rt_cpu_ticks "$RT_AGENT_PID")
      rt_run_bounded 300 "$RT_TMP/one.out" python3 "$py" client "$port" "$mode" "$mib"
      g1=$(rt_cpu_ticks "$RT_GW_PID")
      a1=$(rt_cpu_ticks "$RT_AGENT_PID")
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$path" "$run" "$(<"$RT_TMP/one.out")" \
        $((g1 - g0)) $((a1 - a0)) >>"$results"
      rt_log "$mode $path run $run: $(<"$RT_TMP/one.out") MiB/s"
    done
  done
done

tck=$(rt_clk_tck)
{
  echo "## TCP tunnel throughput ($mib MiB per transfer, median of $runs)"
  echo
  rt_machine_facts
  echo
  echo "Command: \`scripts/tcp-throughput.sh --mib $mib --runs $runs${cores:+ --cores $cores}\`"
  echo
  echo "| direction | direct MiB/s | tunnel MiB/s | tunnel / direct | gateway CPU µs/MiB | agent CPU µs/MiB |"
  echo "|---|---|---|---|---|---|"
  for mode in up down; do
    awk -F'\t' -v m="$mode" -v mib="$mib" -v tck="$tck" '
      function median(a, n,   i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      $1 == m && $2 == "direct" { d[++nd] = $4 }
      $1 == m && $2 == "tunnel" { t[++nt] = $4; g += $5; a += $6 }
      END {
        md = median(d, nd); mt = median(t, nt)
        us = 1e6 / tck / (nt * mib)
        printf "| %s | %.0f | %.0f | %.2f | %.0f | %.0f |\n", (m == "up" ? "upload (client -> service)" : "download (service -> client)"), md, mt, mt / md, g * us, a * us
      }' "$results"
  done
} | tee "$report"
rt_log "report: $report"
