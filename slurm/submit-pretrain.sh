#!/usr/bin/env bash
# Submit ALBEF pretraining (slurm/pretrain.sbatch, or pretrain-deepspeed.sbatch) with the
# common options, optionally followed by a retrieval eval (slurm/eval.sbatch,
# --dependency=afterok). Prints the job ids. All logs go to RUN_DIR/logs.
#
#   slurm/submit-pretrain.sh --run-dir DIR [--config C] [--ds-config JSON] [--nodes N]
#       [--gpus-per-node G] [--cpus-per-task C] [--partition P] [--account A] [--time T]
#       [--warn-seconds S] [--deepspeed-launcher] [--cpu] [--venv DIR] [--sbatch "ARGS"]
#       [--eval SPLIT [--image-root DIR]] [-- PRETRAIN_ARGS...]
#
#   --run-dir DIR         run directory on a shared file system (required); resubmitting
#                         with the same DIR resumes from its newest complete checkpoint
#   --config C            YAML config or preset (default: albef-base)
#   --ds-config JSON      DeepSpeed config (default: the config's)
#   --nodes N             nodes (default 1); --gpus-per-node G (default 8): one rank per GPU
#   --cpus-per-task C     CPUs per rank (default: the script's #SBATCH line)
#   --partition/--account/--time   as sbatch's
#   --warn-seconds S      SIGUSR1 this many seconds before the time limit (default 300)
#   --deepspeed-launcher  single node, `deepspeed` launcher (pretrain-deepspeed.sbatch)
#   --cpu                 no GPUs (the local test cluster): G ranks per node on CPU
#   --venv DIR            virtualenv activated in the jobs (VENV)
#   --sbatch "ARGS"       more sbatch options for the jobs, e.g. "--qos=high --mem=0"
#   --eval SPLIT          after training succeeds, eval-retrieval on SPLIT into RUN_DIR/eval-*
#   after --               passed to `albef-ds pretrain`, e.g. -- --set train.max_steps=1000
#
# Example (4 nodes x 8 GPUs, CC3M shards on the shared file system):
#   slurm/submit-pretrain.sh --run-dir /shared/runs/albef-cc3m --nodes 4 --partition gpu \
#       --account myproj --venv /shared/venvs/albef -- \
#       --set data.train_dirs=[/shared/cc3m_mds] --set data.tokenizer=/shared/bert-base-uncased
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
RUN_DIR= CONFIG=albef-base DS_CONFIG= NODES=1 GPUS=8 CPUS= PARTITION= ACCOUNT= TIME= WARN=300
DS_LAUNCHER=0 CPU=0 VENV="${VENV:-}" SBATCH_EXTRA= EVAL_SPLIT= IMAGE_ROOT=
pretrain_args=()
while (($#)); do
    case "$1" in
        --run-dir) RUN_DIR="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --ds-config) DS_CONFIG="$2"; shift 2 ;;
        --nodes) NODES="$2"; shift 2 ;;
        --gpus-per-node) GPUS="$2"; shift 2 ;;
        --cpus-per-task) CPUS="$2"; shift 2 ;;
        --partition) PARTITION="$2"; shift 2 ;;
        --account) ACCOUNT="$2"; shift 2 ;;
        --time) TIME="$2"; shift 2 ;;
        --warn-seconds) WARN="$2"; shift 2 ;;
        --deepspeed-launcher) DS_LAUNCHER=1; shift ;;
        --cpu) CPU=1; shift ;;
        --venv) VENV="$2"; shift 2 ;;
        --sbatch) SBATCH_EXTRA="$2"; shift 2 ;;
        --eval) EVAL_SPLIT="$2"; shift 2 ;;
        --image-root) IMAGE_ROOT="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; pretrain_args=("$@"); break ;;
        *) echo "unknown option $1" >&2; usage ;;
    esac
done
[[ -n "$RUN_DIR" ]] || usage
for n in "$NODES" "$GPUS" "$WARN"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "--nodes/--gpus-per-node/--warn-seconds take integers" >&2; exit 2; }
done
for a in "${pretrain_args[@]}"; do
    [[ "$a" != *" "* ]] || { echo "pretrain arguments with spaces are not supported: '$a'" >&2; exit 2; }
done
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }
RUN_DIR="$(abspath "$RUN_DIR")"
[[ -f "$CONFIG" ]] && CONFIG="$(abspath "$CONFIG")"
[[ -n "$DS_CONFIG" && -f "$DS_CONFIG" ]] && DS_CONFIG="$(abspath "$DS_CONFIG")"
mkdir -p "$RUN_DIR/logs"

read -ra extra <<<"$SBATCH_EXTRA"
opts=(--signal="B:USR1@$WARN")
[[ -n "$PARTITION" ]] && opts+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && opts+=(--account="$ACCOUNT")
[[ -n "$TIME" ]] && opts+=(--time="$TIME")
[[ -n "$CPUS" ]] && opts+=(--cpus-per-task="$CPUS")
if ((CPU)); then
    export DEVICE=cpu
    opts+=(--gpus-per-node=0)
else
    export DEVICE=gpu
    opts+=(--gpus-per-node="$GPUS")
fi
if ((DS_LAUNCHER)); then
    ((NODES == 1)) || { echo "--deepspeed-launcher runs on one node (use the srun script for more)" >&2; exit 2; }
    script="$HERE/pretrain-deepspeed.sbatch"
    opts+=(--nodes=1 --ntasks=1)
    export NUM_RANKS="$GPUS"
else
    script="$HERE/pretrain.sbatch"
    opts+=(--nodes="$NODES" --ntasks-per-node="$GPUS")
fi

export RUN_DIR CONFIG DS_CONFIG VENV EXTRA_ARGS="${pretrain_args[*]}"
job="$(sbatch --parsable "${opts[@]}" --output="$RUN_DIR/logs/slurm-%j.out" "${extra[@]}" "$script")"
job="${job%%;*}"
echo "pretraining job $job: $script, $NODES node(s) x $GPUS rank(s), run dir $RUN_DIR"
echo "  log: $RUN_DIR/logs/pretrain-$job.log   (SLURM's own messages: $RUN_DIR/logs/slurm-$job.out)"
echo "PRETRAIN_JOB_ID=$job"

if [[ -n "$EVAL_SPLIT" ]]; then
    eval_opts=(--dependency="afterok:$job" --kill-on-invalid-dep=yes)
    [[ -n "$PARTITION" ]] && eval_opts+=(--partition="$PARTITION")
    [[ -n "$ACCOUNT" ]] && eval_opts+=(--account="$ACCOUNT")
    [[ -n "$CPUS" ]] && eval_opts+=(--cpus-per-task="$CPUS")
    ((CPU)) && eval_opts+=(--gpus-per-node=0)
    export MODEL="$RUN_DIR" SPLIT="$(abspath "$EVAL_SPLIT")"
    [[ -n "$IMAGE_ROOT" ]] && export IMAGE_ROOT="$(abspath "$IMAGE_ROOT")"
    eval_job="$(sbatch --parsable "${eval_opts[@]}" --output="$RUN_DIR/logs/eval-%j.out" "${extra[@]}" \
        "$HERE/eval.sbatch")"
    eval_job="${eval_job%%;*}"
    echo "eval job $eval_job (afterok:$job): results in $RUN_DIR/eval-$(basename "${EVAL_SPLIT%.json}")"
    echo "EVAL_JOB_ID=$eval_job"
fi
