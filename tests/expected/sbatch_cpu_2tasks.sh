#!/bin/bash
# cgpt pretraining, rendered by slurm/submit.py from the Hydra config (change the config, not this file).
#SBATCH --job-name=smoke
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=10
#SBATCH --output=/srv/cgpt/outputs/smoke/slurm/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@60
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
export OMP_NUM_THREADS=1
export PYTHONUNBUFFERED=1

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 --cpus-per-task=1 \
    python train/pretrain.py \
    paths.root_dir=/srv/cgpt \
    experiment=smoke \
    strategy=ddp \
    trainer.devices=2
