#!/usr/bin/env bash
# A single-node SLURM "cluster" on 127.0.0.1 for the multi-host tests
# (Debian 12 packages slurmctld, slurmd, slurm-client, munge; root; no systemd).
#
#   slurm_local.sh up      write the config, start munged + slurmctld + slurmd,
#                          wait until the node is idle
#   slurm_local.sh down    stop exactly the daemons started by `up` (pidfiles),
#                          then remove the state directory
#   slurm_local.sh env     print `export SLURM_CONF=...` for clients
#   slurm_local.sh status  daemon pids and sinfo
#
# It installs nothing: without the binaries `up` exits 3 naming what is missing
# (.ci/run installs them). Nothing is written under /etc; munged uses the key
# Debian's postinst created (/etc/munge/munge.key), or SLURM_LOCAL_AUTH=none
# runs without munge.
#
# Env: SLURM_LOCAL_DIR (/tmp/gintrain-slurm), SLURM_LOCAL_PORT (24610: slurmctld;
# +1 slurmd; +10..+40 srun), SLURM_LOCAL_CPUS (nproc), SLURM_LOCAL_AUTH
# (munge|none). Adapted from the tested recipe in the project's notes.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/gintrain-slurm}
PORT=${SLURM_LOCAL_PORT:-24610}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
AUTH=${SLURM_LOCAL_AUTH:-munge}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf
MSOCK=$DIR/munge/munge.socket
say() { echo "[slurm_local] $*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

check_binaries() {
  local missing=() b
  for b in slurmctld slurmd srun sbatch sinfo scontrol; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  if [[ $AUTH == munge ]]; then
    for b in munged munge; do command -v "$b" >/dev/null || missing+=("$b"); done
  fi
  if ((${#missing[@]})); then
    say "missing: ${missing[*]} (apt-get install slurmctld slurmd slurm-client munge)"
    exit 3
  fi
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 755 "$DIR" "$DIR/munge"  # munged wants an a+x socket directory
  local auth="AuthType=auth/munge
AuthInfo=socket=$MSOCK
CredType=cred/munge"
  [[ $AUTH == none ]] && auth="AuthType=auth/none
CredType=cred/none"
  # slurmd finds itself by NodeName == `hostname -s`, which must resolve;
  # JAX takes the coordinator host from SLURM_STEP_NODELIST, i.e. this name.
  cat >"$CONF" <<CONF
ClusterName=gintrain
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SrunPortRange=$((PORT + 10))-$((PORT + 40))
SlurmUser=root
SlurmdUser=root
$auth
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
# run the scheduler every second (default 60 s), so a requeued job starts soon
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
  [[ $AUTH == munge ]] || return 0
  alive "$DIR/munged.pid" && return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "no /etc/munge/munge.key (munge's postinst creates it); use SLURM_LOCAL_AUTH=none"
    exit 3
  fi
  chown munge:munge "$DIR/munge"
  # as the munge user, who owns Debian's key (munged refuses root without --force)
  runuser -u munge -- munged --socket="$MSOCK" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" --key-file=/etc/munge/munge.key
  local _
  for _ in $(seq 50); do [[ -S $MSOCK ]] && break; sleep 0.1; done
  cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
  munge -S "$MSOCK" -n | unmunge -S "$MSOCK" >/dev/null
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports() {  # another SLURM on our ports would silently take our jobs
  local p
  for p in "$PORT" "$((PORT + 1))"; do
    if port_busy "$p"; then
      say "127.0.0.1:$p is already in use (another slurmctld/slurmd?);" \
        "stop it or set SLURM_LOCAL_PORT"
      exit 4
    fi
  done
}

start_slurm() {
  export SLURM_CONF=$CONF
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
  local state="" _
  for _ in $(seq 300); do  # up to 30 s; usually < 0.5 s
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
    [[ $state == idle || $state == mixed || $state == allocated ]] && break
    sleep 0.1
  done
  if [[ $state != idle && $state != mixed && $state != allocated ]]; then
    say "node did not become idle (state '$state'); logs:"
    tail -n 30 "$DIR"/log/*.log >&2 || true
    return 1
  fi
  say "up: node $NODE $state, SLURM_CONF=$CONF"
}

down() {
  # SIGTERM all at once (each takes ~2 s), SIGKILL what is left after 10 s;
  # only the pids of our own pidfiles.
  local f pids=() pid any _
  for f in slurmd slurmctld munged; do
    alive "$DIR/$f.pid" && pids+=("$(cat "$DIR/$f.pid")")
  done
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
      any=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
      ((any)) || break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then say "SIGKILL $pid"; kill -9 "$pid"; fi
    done
  fi
  rm -rf "$DIR"
  say "down"
}

case ${1:-} in
  up)
    check_binaries
    alive "$DIR/slurmctld.pid" || check_ports
    write_conf; start_munge; start_slurm ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    for f in munged slurmctld slurmd; do
      if alive "$DIR/$f.pid"; then echo "$f $(cat "$DIR/$f.pid")"; else echo "$f dead"; fi
    done
    SLURM_CONF=$CONF sinfo || true ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
