#!/usr/bin/env bash
# Records py-spy profiles of the gochat server while the bench drives it, attaching by PID so the
# bench's own measurements (CPU from /proc, latency) are taken exactly as in a normal run.
#
#   profiles/record.sh [SCENARIO] [bench args...]
#
#   SCENARIO  fanout-a (default): room fan-out, mode (a), 64 B
#             fanout-b           : room fan-out, mode (b) coalesced batches
#             storm              : connect + authenticate
#             direct             : direct messages, durable path
#
# Writes profiles/<scenario>.svg (flame graph), profiles/<scenario>.txt (collapsed stacks) and
# profiles/<scenario>-top.md (top self/inclusive costs, from profiles/top.py). Needs py-spy
# (pip install -r bench/requirements.txt) and ptrace rights over the server (root, or
# kernel.yama.ptrace_scope=0). --native adds the C frames of the Cython modules and CPython;
# py-spy pauses the server for each native sample, so the bench numbers of a profiled run are
# not results (the profile is).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
[ -x "$PYSPY" ] || PYSPY=$(command -v py-spy || true)
[ -n "$PYSPY" ] || { echo "record.sh: py-spy not found (pip install -r bench/requirements.txt)" >&2; exit 1; }

scenario=${1:-fanout-a}
shift || true
out=profiles
work=$(mktemp -d /tmp/gochat-profile.XXXXXX)
trap 'rm -rf "$work"' EXIT

case "$scenario" in
  fanout-a|fanout-b)
    bench=(fanout --targets gochat --subscribers "${SUBS:-5000}" --sizes 64 --duration "${DURATION:-15}") ;;
  storm)
    bench=(storm --storm "${CONNS:-12000}") ;;
  direct)
    bench=(direct --rates "${RATE:-4000}" --duration 15) ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac

"$PY" -m bench "${bench[@]}" "$@" --out "$work/run" > "$work/bench.log" 2>&1 &
bench_pid=$!

# wait for the gochat server of the run, then for the measured phase to start
pidfile=""
for _ in $(seq 1 600); do
  pidfile=$(find "$work/run/logs" -name 'gochat-server.pid' 2>/dev/null | head -1 || true)
  [ -n "$pidfile" ] && break
  sleep 0.2
done
[ -n "$pidfile" ] || { echo "no gochat server appeared; see $work/bench.log" >&2; cat "$work/bench.log" >&2; exit 1; }
server=$(cat "$pidfile")
case "$scenario" in
  fanout-a) until grep -q "subscribers ready" "$work/bench.log"; do sleep 0.2; done; sleep 2; secs=${SECS:-5} ;;
  fanout-b) until grep -q "mode a: latency" "$work/bench.log"; do sleep 0.2; done; sleep 1; secs=${SECS:-5} ;;
  storm) sleep 3; secs=${SECS:-4} ;;
  direct) until grep -q "pairs ready" "$work/bench.log"; do sleep 0.2; done; sleep 2; secs=${SECS:-8} ;;
esac
echo "record.sh: profiling gochat pid $server for ${secs}s ($scenario)" >&2
"$PYSPY" record --pid "$server" --native --rate 200 --duration "$secs" \
  --format raw -o "$out/$scenario.txt" >/dev/null 2>&1 &
spy_raw=$!
wait $spy_raw || true
"$PYSPY" record --pid "$server" --native --rate 200 --duration "$secs" \
  -o "$out/$scenario.svg" >/dev/null 2>&1 || true
wait $bench_pid || { echo "bench failed:" >&2; tail -20 "$work/bench.log" >&2; }
"$PY" profiles/top.py "$out/$scenario.txt" > "$out/$scenario-top.md"
echo "record.sh: wrote $out/$scenario.svg $out/$scenario.txt $out/$scenario-top.md" >&2
