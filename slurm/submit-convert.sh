#!/usr/bin/env bash
# Submit the conversion as a SLURM array (slurm/convert.sbatch) plus the merge
# (slurm/merge.sbatch) with --dependency=afterok on the array. Prints both job ids.
#
#   slurm/submit-convert.sh --out DIR [--tasks T] [--input-format F] [--workers N]
#                           [--cpus-per-task C] [--logs DIR] [--sbatch "ARGS"]
#                           INPUT... [-- CONVERT_ARGS...]
#
#   --tasks T         array tasks (default 4): each converts 1/T of the input's units
#   --workers N       converter processes per task (default: --cpus-per-task)
#   --cpus-per-task C CPUs per array task (default: convert.sbatch's #SBATCH line)
#   --logs DIR        job logs (default: OUT.logs): convert-ARRAY_TASK.out, merge-JOB.out
#   --sbatch "ARGS"   extra sbatch options for both jobs, e.g. "--partition=cpu --account=x"
#                     (SBATCH_PARTITION, SBATCH_ACCOUNT, ... in the environment work too)
#   after --           passed to `albef-data convert`, e.g. -- --no-header --caption-col 1
# Environment: VENV (activated in the jobs), ALBEF_DATA (the albef-data command).
#
# Example (CC3M TSV, 16 tasks of 8 CPUs):
#   slurm/submit-convert.sh --out /shared/cc3m_mds --tasks 16 --cpus-per-task 8 \
#       --input-format tsv Train_GCC-training.tsv -- --no-header --caption-col 0 --image-col 1
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
OUT= TASKS=4 INPUT_FORMAT= WORKERS= CPUS= LOGS= SBATCH_EXTRA=
inputs=() convert_args=()
while (($#)); do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --tasks) TASKS="$2"; shift 2 ;;
        --input-format) INPUT_FORMAT="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --cpus-per-task) CPUS="$2"; shift 2 ;;
        --logs) LOGS="$2"; shift 2 ;;
        --sbatch) SBATCH_EXTRA="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; convert_args=("$@"); break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) inputs+=("$1"); shift ;;
    esac
done
[[ -n "$OUT" && ${#inputs[@]} -gt 0 ]] || usage
[[ "$TASKS" =~ ^[1-9][0-9]*$ ]] || { echo "--tasks must be a positive integer" >&2; exit 2; }
for p in "${inputs[@]}" "$OUT"; do
    [[ "$p" != *" "* ]] || { echo "paths with spaces are not supported: '$p'" >&2; exit 2; }
done
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }
OUT="$(abspath "$OUT")"
LOGS="$(abspath "${LOGS:-${OUT%/}.logs}")"
abs_inputs=()
for p in "${inputs[@]}"; do abs_inputs+=("$(abspath "$p")"); done
mkdir -p "$OUT" "$LOGS"

read -ra extra <<<"$SBATCH_EXTRA"
cpu_args=()
[[ -n "$CPUS" ]] && cpu_args=(--cpus-per-task="$CPUS")

export INPUT="${abs_inputs[*]}" OUT INPUT_FORMAT WORKERS CONVERT_ARGS="${convert_args[*]}"
array_id="$(sbatch --parsable --array="0-$((TASKS - 1))" "${cpu_args[@]}" \
    --output="$LOGS/convert-%A_%a.out" "${extra[@]}" "$HERE/convert.sbatch")"
array_id="${array_id%%;*}"
merge_id="$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    --output="$LOGS/merge-%j.out" "${extra[@]}" "$HERE/merge.sbatch")"
merge_id="${merge_id%%;*}"
echo "convert array job $array_id ($TASKS tasks), merge job $merge_id (afterok:$array_id); logs in $LOGS"
echo "ARRAY_JOB_ID=$array_id"
echo "MERGE_JOB_ID=$merge_id"
