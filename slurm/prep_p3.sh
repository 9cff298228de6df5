#!/usr/bin/env bash
#SBATCH --job-name=prep_p3
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#
# P3 → few-shot episode shards as a job array: task I prepares piece I of N (a block of the sorted subsets) of
# every split; the first task submits slurm/prep_merge.sh with --dependency=afterok on the array, which merges
# the pieces' manifests and verifies the shards.
#
#   sbatch slurm/prep_p3.sh                                   # 16 pieces
#   P3_SRC=P3 SPLITS=train sbatch --array=0-63 slurm/prep_p3.sh
#
# Environment (defaults in brackets; relative paths are relative to the repository root):
#   P3_SRC         copy of P3 (data/<subset>/... or the parquet export) [data/P3]
#   OUT            output root; each split goes to OUT/<split> [data/p3]
#   SPLITS         splits to prepare ["train eval"]
#   PREP_ARGS      extra arguments of python -m data_prep.p3 (e.g. "--shots 16") []
#   NUM_JOBS       pieces [the array size]
#   WORKERS        processes per task [$SLURM_CPUS_PER_TASK]
#   SUBMIT_MERGE   1: the first task submits the merge job [1]
#   MERGE_SBATCH_ARGS  extra sbatch options of the merge job (e.g. "--output=logs/merge-%j.out") []
#   VENV, HYPERTRAIN_REPO   as in the training scripts (docs/cluster.md)
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
prep_array_job data_prep.p3 "${P3_SRC:-data/P3}" "${OUT:-data/p3}" "${SPLITS:-train eval}" "$@"
