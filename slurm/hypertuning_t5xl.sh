#!/usr/bin/env bash
#SBATCH --job-name=hypertuning_t5xl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Train HyperTuning (all prefixes at once; HART's baseline) on T5-XL.
#
#   sbatch slurm/hypertuning_t5xl.sh                        # one node x 8 GPUs (deepspeed launcher)
#   sbatch --nodes=4 slurm/hypertuning_t5xl.sh              # 4 nodes (srun + torchrun, c10d rendezvous on the first)
#   RUN_DIR=runs/hypertuning-lr1e-4 sbatch slurm/hypertuning_t5xl.sh train.lr=1e-4   # arguments are config overrides
#
# Submit from the repository root. Environment (exported to the job by sbatch; defaults in brackets):
#   CONFIG               experiment file [configs/hypertuning_t5xl.yaml]
#   DS_CONFIG            DeepSpeed config [ds_configs/zero2.json]
#   OVERRIDES            space-separated key=value config overrides, before the script's arguments []
#   RUN_DIR              run directory: checkpoints, metrics, the sqlite MLflow store; a requeued or resubmitted
#                        job resumes from it [runs/hypertuning_t5xl]
#   MLFLOW_TRACKING_URI  MLflow server [unset: sqlite:///$RUN_DIR/mlflow.db]
#   GPUS_PER_NODE        ranks per node [$SLURM_GPUS_ON_NODE, else 8]; CPU-only nodes must set it
#   LAUNCHER             auto | deepspeed | torchrun [auto: deepspeed on one node, srun + torchrun on several]
#   MASTER_PORT          rendezvous port [29500 + job id mod 10000]
#   VENV                 virtual environment to activate [.venv, if present]
#   REQUEUE_ON_SIGNAL    1: requeue after the USR1 checkpoint, 0: just stop [1]
#   HYPERTRAIN_REPO      repository root [$SLURM_SUBMIT_DIR]
# Preemption: 300 s before the time limit Slurm sends USR1 to this script, which tells the training ranks to
# checkpoint, then requeues the job; the restarted job resumes from RUN_DIR and continues the same MLflow run.
# See docs/cluster.md.
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
train_job "${CONFIG:-configs/hypertuning_t5xl.yaml}" "${RUN_DIR:-runs/hypertuning_t5xl}" "$@"
