#!/bin/bash
# cgpt pretraining, rendered by slurm/submit.py from the Hydra config (change the config, not this file).
#SBATCH --job-name=cerebras-gpt-demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=8
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --partition=gpu
#SBATCH --output=/srv/cgpt/outputs/cerebras-gpt-demo/slurm/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue

# srun starts one task per device (trainer.devices x trainer.num_nodes processes); Lightning takes
# the ranks from SLURM_PROCID / SLURM_LOCALID. Before the time limit SLURM sends USR1: the run saves
# a checkpoint at the next step boundary and requeues this job, which runs this script again and
# resumes from <output_dir>/checkpoints/last.ckpt in the same W&B run.
set -euo pipefail
cd /srv/cgpt
# (no setup lines)

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
export OMP_NUM_THREADS=8
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=WARN
export PYTHONUNBUFFERED=1

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 --cpus-per-task=8 \
    python train/pretrain.py \
    paths.root_dir=/srv/cgpt \
    trainer.devices=8
