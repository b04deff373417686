#!/usr/bin/env bash
# CPU flame graph of the gateway or the agent under load. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

usage() {
  cat <<'EOF'
Usage: perf/record.sh [options]

Starts echo (no delay) + gateway + agent on 127.0.0.1, drives a closed-loop
load through the tunnel, samples the chosen process with `perf record`
while the load runs, and folds the samples into a flame graph:

  perf script | inferno-collapse-perf | inferno-flamegraph > results/flame-<target>.svg

Options:
  --target T         gateway | agent | echo (default gateway)
  --conns N          concurrency (default 100)
  --duration D       how long perf samples (default 10s; the load runs 2 s longer)
  --delay-ms MS      backend delay (default 0)
  --freq HZ          sampling frequency (default 499)
  --call-graph M     dwarf (default; works without frame pointers) | fp (= -g) | lbr
  --out DIR          output directory (default results/)
  -h, --help         this text

Needs: perf (installed with `apt-get install -y linux-perf` when missing and
running as root), inferno (`cargo install inferno` when missing). Each
install is announced; a failed one stops the script with the reason.
Outputs: DIR/flame-<target>.svg, DIR/flame-<target>.folded, and the load's
table in DIR/flame-<target>.txt. perf.data stays in a temp dir.
EOF
}

target=gateway conns=100 duration=10s delay=0 freq=499 callgraph=dwarf out=""
while (($#)); do
  case $1 in
    --target) rt_need_arg "$@"; target=$2; shift 2 ;;
    --conns) rt_need_arg "$@"; conns=$2; shift 2 ;;
    --duration) rt_need_arg "$@"; duration=$2; shift 2 ;;
    --delay-ms) rt_need_arg "$@"; delay=$2; shift 2 ;;
    --freq) rt_need_arg "$@"; freq=$2; shift 2 ;;
    --call-graph) rt_need_arg "$@"; callgraph=$2; shift 2 ;;
    --out) rt_need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $target in gateway | agent | echo) ;; *) echo "--target must be gateway, agent or echo" >&2; exit 2 ;; esac
case $callgraph in
  dwarf) cg=(--call-graph "dwarf,16384") ;;
  fp) cg=(-g) ;;
  lbr) cg=(--call-graph lbr) ;;
  *) echo "--call-graph must be dwarf, fp or lbr" >&2; exit 2 ;;
esac

rt_init perf-record
# shellcheck source=perf/tools.sh
source "$RT_ROOT/perf/tools.sh"
rt_need_perf
rt_need_inferno
rt_bin
out=${out:-$RT_ROOT/results}
mkdir -p "$out"
base=$out/flame-$target
secs=$(rt_secs "$duration")

rt_echo echo "$delay"
rt_gateway gateway
rt_agent agent "$RT_GW_TUNNEL" demo "$RT_ECHO_ADDR"
case $target in
  gateway) pid=$RT_GW_PID ;;
  agent) pid=$RT_AGENT_PID ;;
  echo) pid=$RT_ECHO_PID ;;
esac

# The load runs in the background: 1 s warmup, then secs + 2 measured, so
# that perf's window sits inside steady load.
bench=(bench "http://$RT_GW_PUBLIC/" --host demo -c "$conns" -d "$((secs + 2))s" --warmup 1s)
timeout --kill-after=5 $((secs + 60)) "${RT_BENCH[@]}" "${bench[@]:1}" >"$base.txt" &
bench_pid=$!
RT_PIDS+=("$bench_pid")
sleep 1.5

event=(-e cpu-clock)
# Capture first: `| grep -q` under pipefail races with perf's SIGPIPE.
probe=$(perf stat -e cycles true 2>&1 || true)
if [[ $probe == *"not supported"* || $probe == *"not counted"* ]]; then
  rt_log "hardware cycles not available (VM?): sampling the cpu-clock software event"
else
  event=(-e cycles)
fi
rt_log "perf record ${event[*]} -F $freq ${cg[*]} -p $pid ($target) for ${secs}s"
perf record "${event[@]}" -F "$freq" "${cg[@]}" -p "$pid" -o "$RT_TMP/perf.data" \
  -- sleep "$secs" 2>"$RT_TMP/perf-record.err" ||
  { cat "$RT_TMP/perf-record.err" >&2; rt_die "perf record failed"; }
grep -v '^\[ perf record: Woken' "$RT_TMP/perf-record.err" >&2 || true

rc=0
wait "$bench_pid" || rc=$?
cat "$base.txt"
((rc == 0)) || rt_log "warning: the load generator exited with $rc"

rt_log "folding stacks (perf script | inferno-collapse-perf)"
perf script -i "$RT_TMP/perf.data" 2>/dev/null | inferno-collapse-perf >"$base.folded"
[[ -s $base.folded ]] || rt_die "no samples folded (is $target busy? see $RT_TMP)"
inferno-flamegraph --title "ringtunnel $target, c=$conns, ${secs}s" <"$base.folded" >"$base.svg"
samples=$(sed -n 's/.*(\([0-9]*\) samples).*/\1/p' "$RT_TMP/perf-record.err")
rt_log "wrote $base.svg (${samples:-?} samples) and $base.folded"
echo
echo "top 15 leaf functions (share of sampled time):"
awk '{ n = $NF; $NF = ""; k = split($0, f, ";"); leaf = f[k]; sub(/ +$/, "", leaf); s[leaf] += n; t += n }
  END { for (l in s) printf "%6.2f%%  %s\n", 100 * s[l] / t, l }' "$base.folded" | sort -rn | head -15
