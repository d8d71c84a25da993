#!/usr/bin/env bash
# One training stage on N nodes x G GPUs under Slurm: one torchrun agent per node (srun), a c10d rendezvous on the
# first node, the stage command behind it, exactly what `nst train-student g1` runs on one machine.
#   sbatch --nodes=2 --gpus-per-node=8 docker/slurm-train.sh train-student g1 params.yaml
# Needs: the repository (with its .venv) and out_dir on a file system every node mounts (checkpoints are read back
# by every rank on resume); images may stay in S3 (data.* = s3://... shards). params.yaml must say the same world:
# distributed.nnodes = --nodes, distributed.nproc_per_node = --gpus-per-node (another size is refused, one line).
#SBATCH --job-name=nst-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=nst-%x-%j.log
set -euo pipefail
STAGE=${1:-train-student}
GEN=${2:-g1}
PARAMS=${3:-params.yaml}
GPUS=${SLURM_GPUS_PER_NODE:-1}
GPUS=${GPUS##*:}                       # "h100:8" -> 8
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${NST_RDZV_PORT:-29500}
GEN_ARG=()
[ "$STAGE" = train-teacher ] || GEN_ARG=("$GEN")
# --kill-on-bad-exit: one agent failing stops the others (no orphans); re-submitting resumes from the checkpoint.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  .venv/bin/python -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "nst-$SLURM_JOB_ID" \
    -m cli "$STAGE" "${GEN_ARG[@]}" -p "$PARAMS"
