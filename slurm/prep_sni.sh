#!/usr/bin/env bash
#SBATCH --job-name=prep_sni
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#
# Super-NaturalInstructions → episode shards as a job array: task I prepares piece I of N (a block of the sorted
# task list) of every split; the first task submits slurm/prep_merge.sh with --dependency=afterok on the array,
# which merges the pieces' manifests and verifies the shards.
#
#   sbatch slurm/prep_sni.sh                                  # 8 pieces
#   SNI_SRC=natural-instructions sbatch --array=0-31 slurm/prep_sni.sh
#
# Environment (defaults in brackets; relative paths are relative to the repository root):
#   SNI_SRC        checkout of the S-NI repository (tasks/, splits/) [data/natural-instructions]
#   OUT            output root; each split goes to OUT/<split> [data/sni]
#   SPLITS         splits to prepare ["train test"]
#   PREP_ARGS      extra arguments of python -m data_prep.sni (e.g. "--max-instances-per-task 100") []
#   NUM_JOBS       pieces [the array size]
#   WORKERS        processes per task [$SLURM_CPUS_PER_TASK]
#   SUBMIT_MERGE   1: the first task submits the merge job [1]
#   MERGE_SBATCH_ARGS  extra sbatch options of the merge job (e.g. "--output=logs/merge-%j.out") []
#   VENV, HYPERTRAIN_REPO   as in the training scripts (docs/cluster.md)
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
prep_array_job data_prep.sni "${SNI_SRC:-data/natural-instructions}" "${OUT:-data/sni}" "${SPLITS:-train test}" "$@"
