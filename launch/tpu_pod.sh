#!/usr/bin/env bash
# launch/tpu_pod.sh: TEMPLATE (not tested here: needs a Cloud TPU pod slice).
# Starts the runner on every host (worker) of a multi-host Cloud TPU VM slice,
# one process per host, each driving all of its local TPU chips.
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       --gin_file=default.gin --workdir=/mnt/shared/runs/exp1
#
# Arguments are passed to `python3 -m gintrain.runner.train` on every worker.
# --multiprocess=on lets jax.distributed.initialize() detect the slice (GCE
# TPU metadata: worker count, worker id, coordinator = worker 0), so no
# coordinator flag is needed. --workdir must be visible from every host
# (a shared filesystem such as Filestore/NFS); the repository must be
# installed on every worker (`pip install -e .`) at $REPO_DIR.
#
# Preemption: a preemptible/spot TPU VM gets SIGTERM before it is reclaimed;
# the runner then writes one synchronized checkpoint and exits 75
# (EX_TEMPFAIL). This script exits with that status: recreate the slice (or
# let a queued resource do it) and run the same command again to resume.
#
# Env: TPU (slice name, required), ZONE (required), PROJECT (gcloud default),
# REPO_DIR (~/gintrain on the workers), PY (python3).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM slice name}"
: "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/gintrain'}
PY=${PY:-python3}
project=()
[[ -n ${PROJECT:-} ]] && project=(--project "$PROJECT")

printf -v args ' %q' "$@"
# All workers in parallel; gcloud returns the first non-zero worker status.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project[@]}" \
  --worker=all \
  --command="cd $REPO_DIR && $PY -m gintrain.runner.train --multiprocess=on$args"
