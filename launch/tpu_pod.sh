#!/usr/bin/env bash
# GRPO on a Cloud TPU pod slice: create the TPU VM, copy this checkout to every worker, install,
# and start the same command on all workers (one JAX process per host; JAX finds the pod's
# coordinator, process count and index itself: --config.distributed.auto_detect=True).
#
#   bash launch/tpu_pod.sh --dry-run                 # print every command, run nothing
#   TPU_NAME=jigsaw ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/jigsaw_2x1 MODEL_DIR=/models/Qwen2.5-VL-3B-Instruct \
#   DATA_DIR=/data/coco/train2014 bash launch/tpu_pod.sh all
#
# Steps (default: all): create | copy | setup | run | delete. Settings come from the environment:
#   TPU_NAME (jigsaw-grpo), ZONE (us-central2-b), ACCELERATOR_TYPE (v4-32),
#   RUNTIME_VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default), SPOT (0; 1 for spot VMs),
#   CONFIG (configs/jigsaw_2x1.py), WORKDIR (must be shared by all hosts: a gs:// bucket),
#   MODEL_DIR (an HF checkpoint directory present on every worker, e.g. a gcsfuse mount),
#   DATA_DIR (a folder of JPEGs on every worker), MESH ("(1,-1,1)": FSDP over all chips),
#   EXTRA_ARGS (more --config.x=y overrides), REMOTE_DIR (~/jigsaw_jax on the workers).
set -euo pipefail

STEPS=()
DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    create|copy|setup|run|delete|all) STEPS+=("$arg") ;;
    *) echo "error: unknown argument '$arg'; steps: create copy setup run delete all" >&2; exit 2 ;;
  esac
done
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(all)
if [[ " ${STEPS[*]} " == *" all "* ]]; then STEPS=(create copy setup run); fi

TPU_NAME="${TPU_NAME:-jigsaw-grpo}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/jigsaw_2x1.py}"
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/jigsaw_grpo}"
MODEL_DIR="${MODEL_DIR:-}"
DATA_DIR="${DATA_DIR:-}"
MESH="${MESH:-(1,-1,1)}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="${REMOTE_DIR:-~/jigsaw_jax}"
ARCHIVE="/tmp/jigsaw_jax_src.tar.gz"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=${ZONE}")
[[ -n "${PROJECT:-}" ]] && WHERE+=("--project=${PROJECT}")

cd "$(dirname "$0")/.."

show() {  # a command's words, quoted where the shell needs it
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+~-]+$ ]]; then out+=("$word")
    elif [[ "$word" != *"'"* ]]; then out+=("'$word'")
    else out+=("$(printf '%q' "$word")"); fi
  done
  echo "${out[*]}"
}

run() {  # print the command; run it unless this is a dry run
  echo "+ $(show "$@")"
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

# What every worker runs. The environment: logs from every host; HF offline (weights are local).
TRAIN_ARGS="--config=${CONFIG} --workdir=${WORKDIR} --config.distributed.auto_detect=True"
TRAIN_ARGS+=" \"--config.mesh.shape=${MESH}\""
[[ -n "$MODEL_DIR" ]] && TRAIN_ARGS+=" --config.model.checkpoint=${MODEL_DIR}"
[[ -n "$DATA_DIR" ]] && TRAIN_ARGS+=" --config.data.source.kind=folder --config.data.source.path=${DATA_DIR}"
[[ -n "$EXTRA_ARGS" ]] && TRAIN_ARGS+=" ${EXTRA_ARGS}"
REMOTE_ENV="export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=1 JAX_PLATFORMS=tpu"
TRAIN_CMD="cd ${REMOTE_DIR} && ${REMOTE_ENV} && .venv/bin/python -m jigsaw_jax.main ${TRAIN_ARGS} 2>&1 | tee -a ~/jigsaw_train.log"
SETUP_CMD="mkdir -p ${REMOTE_DIR} && tar xzf ~/jigsaw_jax_src.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e . \"jax[tpu]\""

for step in "${STEPS[@]}"; do
  case "$step" in
    create)
      SPOT_FLAG=()
      [[ "${SPOT:-0}" == 1 ]] && SPOT_FLAG=(--spot)
      run "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" "--accelerator-type=${ACCELERATOR_TYPE}" \
        "--version=${RUNTIME_VERSION}" "${SPOT_FLAG[@]}"
      ;;
    copy)
      # The checkout as git knows it (tracked and untracked-not-ignored files), to every worker.
      run bash -c "git ls-files -co --exclude-standard -z | tar czf ${ARCHIVE} --null -T -"
      run "${GCLOUD[@]}" scp "$ARCHIVE" "${TPU_NAME}:~/jigsaw_jax_src.tar.gz" "${WHERE[@]}" --worker=all
      ;;
    setup)
      run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$SETUP_CMD"
      ;;
    run)
      run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$TRAIN_CMD"
      ;;
    delete)
      run "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
      ;;
  esac
done
