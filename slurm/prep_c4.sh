#!/usr/bin/env bash
#SBATCH --job-name=prep_c4
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#
# C4 → HyperTuning-PT pretraining episodes as a job array: task I prepares piece I of N (a block of the split's
# sorted file list); the first task submits slurm/prep_merge.sh with --dependency=afterok on the array, which merges
# the pieces' manifests and verifies the shards.
#
#   C4_SRC=c4 PREP_ARGS="--max-files 64" sbatch slurm/prep_c4.sh
#   C4_SRC=c4 SPLITS=validation sbatch --array=0-0 slurm/prep_c4.sh
#
# Environment (defaults in brackets; relative paths are relative to the repository root):
#   C4_SRC         C4 as released: the folder holding en/c4-<split>.*.json.gz [data/c4]
#   OUT            output root; each split goes to OUT/<split> [data/c4-episodes]
#   SPLITS         splits to prepare ["train validation"]
#   PREP_ARGS      extra arguments of python -m data_prep.c4 (e.g. "--max-files 64 --chunk-words 96 64 32 96") []
#   NUM_JOBS, WORKERS, SUBMIT_MERGE, MERGE_SBATCH_ARGS, VENV, HYPERTRAIN_REPO   as in slurm/prep_sni.sh
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
prep_array_job data_prep.c4 "${C4_SRC:-data/c4}" "${OUT:-data/c4-episodes}" "${SPLITS:-train validation}" "$@"
