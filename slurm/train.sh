#!/usr/bin/env bash
#SBATCH --job-name=hypertrain
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
# Train any experiment file: the job script `hypertrain repro` submits for each run of a table (one per row and
# column), and the general form of slurm/hart_t5xl.sh.
#
#   CONFIG=configs/repro/sni_t5xl/hart.yaml RUN_DIR=runs/repro/sni_t5xl/hart sbatch slurm/train.sh
#
# Environment: CONFIG (required), RUN_DIR [runs/<config file stem>], and everything slurm/hart_t5xl.sh documents
# (DS_CONFIG, OVERRIDES, MLFLOW_TRACKING_URI, GPUS_PER_NODE, LAUNCHER, ...; docs/cluster.md).
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
[ -n "${CONFIG:-}" ] || hypertrain_die "set CONFIG to the experiment file (e.g. CONFIG=configs/hart_t5xl.yaml)"
config_name=$(basename "$CONFIG" .yaml)
train_job "$CONFIG" "${RUN_DIR:-runs/$config_name}" "$@"
