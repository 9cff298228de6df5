#!/usr/bin/env bash
#SBATCH --job-name=prep_merge
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Join the pieces of a prep job array (python -m data_prep.merge) and verify the result (python -m
# data_prep.verify). Submitted by slurm/prep_sni.sh and slurm/prep_p3.sh with --dependency=afterok:<array job>;
# by hand: MERGE_DIRS="data/sni/train data/sni/test" sbatch --dependency=afterok:1234 slurm/prep_merge.sh
#
# Environment: MERGE_DIRS (space-separated output directories, required), VERIFY (1: verify after merging [1]),
# VENV, HYPERTRAIN_REPO.
set -uo pipefail
repo=${HYPERTRAIN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
. "$repo/slurm/lib.sh" || { echo "hypertrain-slurm: $repo/slurm/lib.sh not found; submit from the repository root" >&2; exit 1; }
cd "$repo" || exit 1
hypertrain_activate "$repo"
[ -n "${MERGE_DIRS:-}" ] || hypertrain_die "MERGE_DIRS is empty (the directories to merge)"
read -r -a dirs <<<"$MERGE_DIRS"
for dir in "${dirs[@]}"; do
  hypertrain_log "merging $dir"
  python -m data_prep.merge "$dir" || hypertrain_die "merge of $dir failed"
done
if [ "${VERIFY:-1}" = 1 ]; then
  python -m data_prep.verify "${dirs[@]}" || hypertrain_die "verification failed"
fi
hypertrain_log "merged and verified: ${dirs[*]}"
