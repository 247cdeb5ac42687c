#!/usr/bin/env bash
# launch/local.sh: start N processes of one command on this host, as one
# multi-process JAX job (no cluster manager needed).
#
#   launch/local.sh [-n N] [-p PORT] [-d DEVICES] [-g] [-l LOGDIR] -- CMD [ARGS...]
#
#   launch/local.sh -n 2 -d 2 -- python -m gintrain.runner.train \
#       --gin_file=default.gin --workdir=/tmp/run
#
# Process i runs `CMD ARGS... --coordinator_address=127.0.0.1:PORT
# --process_count=N --process_index=i` (absl flags of
# runner/parallel/distributed.py), with
# JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT so that process 0's
# coordination service listens on loopback only. Without -p, PORT is a free
# port that the kernel picks (so several jobs can share one host); a port
# given with -p that is in use is refused with one line (exit 2) before any
# process starts: a second coordinator on a busy port would abort the job
# already there.
#
# Options:
#   -n N       number of processes (default 2)
#   -p PORT    coordinator port on 127.0.0.1 (default: a free one, printed;
#              taken from GINTRAIN_PORT_RANGE=LO-HI if that is set)
#   -d D       CPU only: D virtual CPU devices per process (sets JAX_PLATFORMS=cpu
#              and XLA_FLAGS=--xla_force_host_platform_device_count=D)
#   -g         one GPU per process: CUDA_VISIBLE_DEVICES=i for process i
#   -l LOGDIR  write process i's stdout+stderr to LOGDIR/process_i.log
#              (default: to this terminal, each line prefixed with "[i] ")
#
# It prints "local.sh: process I pid P" (stderr) for each process.
# SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) sent to local.sh are forwarded to every
# process (the runner then writes one synchronized checkpoint and exits 75, or
# 130 for SIGINT; a second Ctrl-C aborts it), and local.sh waits for them.
# The processes run with SIGINT at its default (a non-interactive shell starts
# background jobs with SIGINT ignored); the log prefixers ignore SIGINT, so
# that they outlive the processes whose output they carry.
#
# Exit status: 0 if all processes succeed; 75 (EX_TEMPFAIL, "preempted: launch
# again to resume") if every failing process exited 75; otherwise the status
# of the first process (in index order) that failed otherwise (128+N when
# killed by signal N; 130 after Ctrl-C). It waits for all processes; when one
# dies, the runner's heartbeat/barrier timeouts make the others exit.
set -u
N=2; PORT=""; DEVICES=""; GPU=0; LOGDIR=""
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while getopts "n:p:d:gl:h" opt; do
  case $opt in
    n) N=$OPTARG ;; p) PORT=$OPTARG ;; d) DEVICES=$OPTARG ;; g) GPU=1 ;;
    l) LOGDIR=$OPTARG ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
(($# > 0)) || { echo "local.sh: no command given" >&2; usage; }
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n $N: not a positive integer" >&2; exit 2; }
# port_state PORT: "free" or "busy" (127.0.0.1 cannot bind it); with PORT 0,
# a free port: in $GINTRAIN_PORT_RANGE (LO-HI) if set, else one the kernel
# picks.
PY=${GINTRAIN_PYTHON:-python3}
port_state() {
  "$PY" - "$1" "${GINTRAIN_PORT_RANGE:-}" <<'PYEOF' 2>/dev/null
import os, socket, sys
def bindable(port):
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(('127.0.0.1', port))
    except OSError:
      return 0
    return s.getsockname()[1]
port, span = int(sys.argv[1]), sys.argv[2]
if port:
  print('free' if bindable(port) else 'busy')
elif span:
  lo, hi = map(int, span.split('-'))
  first = lo + os.getpid() % (hi - lo + 1)
  for i in range(hi - lo + 1):
    if bindable(lo + (first - lo + i) % (hi - lo + 1)):
      print(lo + (first - lo + i) % (hi - lo + 1))
      break
else:
  print(bindable(0))
PYEOF
}
if [[ -z $PORT ]]; then
  PORT=$(port_state 0)
  [[ $PORT =~ ^[0-9]+$ ]] || { echo "local.sh: error: cannot find a free port on 127.0.0.1 ($PY failed); pass -p PORT" >&2; exit 2; }
  echo "local.sh: coordinator port $PORT (free; -p to choose one)" >&2
else
  [[ $PORT =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) \
    || { echo "local.sh: -p $PORT: not a port number" >&2; exit 2; }
  state=$(port_state "$PORT")
  if [[ $state == busy ]] || { [[ -z $state ]] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }; then
    echo "local.sh: error: -p $PORT: port $PORT on 127.0.0.1 is in use (another job's coordinator?); choose another port or leave -p out to pick a free one" >&2
    exit 2
  fi
fi

export JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$PORT
if [[ -n $DEVICES ]]; then
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -d $DEVICES: not a positive integer" >&2; exit 2; }
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
fi
[[ -n $LOGDIR ]] && mkdir -p "$LOGDIR"

pids=()
forward() {
  local p
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  flags=(--coordinator_address="127.0.0.1:$PORT" --process_count="$N"
         --process_index="$i")
  if ((GPU)); then export CUDA_VISIBLE_DEVICES=$i; fi
  # (trap - INT; exec ...): the process itself (same pid), with SIGINT at
  # its default instead of ignored.
  if [[ -n $LOGDIR ]]; then
    (trap - INT; exec "$@" "${flags[@]}") >"$LOGDIR/process_$i.log" 2>&1 &
  else
    (trap - INT; exec "$@" "${flags[@]}") \
      > >(trap '' INT; exec sed -u "s/^/[$i] /") 2>&1 &
  fi
  pids+=($!)
  echo "local.sh: process $i pid $!" >&2
done

# `wait` returns early (status > 128) when a trapped signal arrives: wait
# again while the process is alive, then fetch its real status.
RC=0
status_of() {  # sets RC (no subshell: only this shell can wait for its children)
  local p=$1 rc rc2
  wait "$p"; rc=$?
  while ((rc > 128)); do
    if kill -0 "$p" 2>/dev/null; then wait "$p"; rc=$?; continue; fi
    wait "$p" 2>/dev/null; rc2=$?
    ((rc2 != 127)) && rc=$rc2
    break
  done
  RC=$rc
}
final=0; preempted=0
for ((i = 0; i < N; i++)); do
  status_of "${pids[$i]}"; rc=$RC
  echo "local.sh: process $i exited with status $rc" >&2
  if ((rc == 75)); then preempted=1
  elif ((rc != 0 && final == 0)); then final=$rc; fi
done
((final == 0 && preempted)) && final=75
exit "$final"
