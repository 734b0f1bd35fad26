#!/bin/bash
# INF-LLaVA training on a Cloud TPU pod slice: the same command on every host (--worker=all);
# jax.distributed.initialize() finds the coordinator, process count and id itself (TPU metadata).
#
#   bash scripts/train_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [train.py flags]
#   DRY_RUN=1 bash scripts/train_tpu_pod.sh ...     # print the gcloud command only
#
# Each host needs the repository at $REPO_DIR (default ~/infllava-jax) with its .venv
# (`pip install -r requirements.txt "jax[tpu]"`), and WORKDIR on storage every host sees
# (a Filestore/NFS mount or a gcsfuse mount of a bucket). Rerunning resumes from the latest
# checkpoint, also on a slice of another size (elastic resume).
#
# Preemption (docs/preemption.md): a maintenance event or a spot/preemptible reclaim sends SIGTERM
# (about 30 s before the host goes); JAX's preemption sync, started by jax.distributed on every
# host, stops all hosts at one step boundary, train.py writes a checkpoint there and exits 0.
# SIGUSR1 (--config.preemption_signal, e.g. sent to train.py on any one host) stops the slice
# the same way. Rerunning the same command continues from that checkpoint.
set -euo pipefail
usage="usage: bash scripts/train_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [train.py flags]"
TPU_NAME=${1:?$usage}; ZONE=${2:?$usage}; CONFIG=${3:?$usage}; WORKDIR=${4:?$usage}
shift 4
REPO_DIR=${REPO_DIR:-'~/infllava-jax'}
train=(.venv/bin/python train.py --config "$CONFIG" --workdir "$WORKDIR"
       --initialization_timeout="${INIT_TIMEOUT:-600}" --heartbeat_timeout="${HEARTBEAT_TIMEOUT:-120}"
       --config.preemption_signal="${PREEMPTION_SIGNAL:-SIGUSR1}" "$@")
remote="cd $REPO_DIR && $(printf '%q ' "${train[@]}")2>&1 | tee -a train-\$(hostname).log"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
