#!/usr/bin/env bash
# launch/mpirun.sh: start the runner (or any command) under Open MPI's mpirun,
# one process per rank; JAX auto-detects the job, no coordinator flag needed.
#
#   launch/mpirun.sh [-n N] [-p PORT] [-H HOSTFILE] [-l] [-d DEVICES] -- CMD [ARGS...]
#
#   launch/mpirun.sh -n 2 -p 24220 -l -d 2 -- python -m gintrain.runner.train \
#       --gin_file=default.gin --workdir=/tmp/run           # one host
#   launch/mpirun.sh -n 8 -p 24220 -H hosts.txt -- python -m gintrain.runner.train \
#       --gin_file=... --workdir=/shared/run                        # a cluster
#
# runner/parallel/distributed.py (--multiprocess=auto) calls jax.distributed.initialize(),
# which reads the rank count and rank from OMPI_COMM_WORLD_* and the
# coordinator host from OMPI_MCA_orte_hnp_uri (Open MPI 4.x; Open MPI 5 sets no
# such variable: pass --coordinator_address=HOST:PORT there).
#
# Options:
#   -n N         ranks (default 2)
#   -p PORT      coordinator port (exported as JAX_COORDINATOR_PORT; default
#                24220; JAX would otherwise pick one in 61440-65535)
#   -H HOSTFILE  Open MPI hostfile (default: this host only)
#   -l           loopback only (single host): --mca oob_tcp_if_include lo and
#                JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT
#   -d D         CPU only: D virtual CPU devices per process
#   extra mpirun options: MPIRUN_ARGS="..." (word-split)
# As root, OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1 are exported (Open MPI refuses
# root otherwise). XLA_FLAGS, JAX_* and PYTHONPATH are passed to remote ranks.
#
# Signals: SIGUSR1 is forwarded by mpirun to every rank. SIGTERM sent to this
# script is turned into SIGUSR1 (mpirun itself would SIGKILL the ranks a
# moment after forwarding SIGTERM, too soon for a checkpoint). Either way the
# runner writes one synchronized checkpoint and exits 75.
#
# Exit status: mpirun's: 0, or the status of the first rank that failed (75 =
# EX_TEMPFAIL, "preempted: launch again to resume"). When a rank fails, mpirun
# kills the others.
set -u
N=2; PORT=24220; HOSTFILE=""; LOOPBACK=0; DEVICES=""
usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while getopts "n:p:H:ld:h" opt; do
  case $opt in
    n) N=$OPTARG ;; p) PORT=$OPTARG ;; H) HOSTFILE=$OPTARG ;; l) LOOPBACK=1 ;;
    d) DEVICES=$OPTARG ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == -- ]] && shift
(($# > 0)) || { echo "mpirun.sh: no command given" >&2; usage; }
command -v mpirun >/dev/null || { echo "mpirun.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 127; }
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: -n $N: not a positive integer" >&2; exit 2; }
[[ $PORT =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) \
  || { echo "mpirun.sh: -p $PORT: not a port number" >&2; exit 2; }

export JAX_COORDINATOR_PORT=$PORT
args=(-np "$N")
[[ -n $HOSTFILE ]] && args+=(--hostfile "$HOSTFILE")
if ((LOOPBACK)); then
  args+=(--mca oob_tcp_if_include lo)
  export JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$PORT
fi
if [[ -n $DEVICES ]]; then
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: -d $DEVICES: not a positive integer" >&2; exit 2; }
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
fi
for v in XLA_FLAGS JAX_PLATFORMS JAX_COORDINATOR_PORT JAX_COORDINATOR_BIND_ADDRESS PYTHONPATH; do
  [[ -n ${!v:-} ]] && args+=(-x "$v")
done
if ((EUID == 0)); then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})

MPIRUN=""
forward() { [[ -n $MPIRUN ]] && kill "-$1" "$MPIRUN" 2>/dev/null; }
trap 'forward USR1' USR1 TERM
trap 'forward INT' INT
mpirun "${args[@]}" "${extra[@]}" "$@" &
MPIRUN=$!
wait "$MPIRUN"; rc=$?
while ((rc > 128)); do   # `wait` returns early on trapped signals
  if kill -0 "$MPIRUN" 2>/dev/null; then wait "$MPIRUN"; rc=$?; continue; fi
  wait "$MPIRUN" 2>/dev/null; rc2=$?
  ((rc2 != 127)) && rc=$rc2
  break
done
exit "$rc"
