#!/usr/bin/env bash
# N JAX processes on this machine, talking through a coordinator on 127.0.0.1 (CPU collectives:
# gloo), exactly as the hosts of a pod or cluster do. Two uses:
#
#   # The multi-controller check: two GRPO updates of a small policy, each process feeding its own
#   # rows, params FSDP-sharded across processes; then every process must hold the same params
#   # (sha256) and they must equal a one-device run's.
#   bash launch/local_multiprocess.sh
#   bash launch/local_multiprocess.sh -n 4 --devices-per-process 2 --mesh 2,-1,1
#
#   # Any training run, multi-controller on one machine (the trainer's config.distributed):
#   bash launch/local_multiprocess.sh -n 2 -- --config=configs/jigsaw_2x1.py:tiny --workdir=/tmp/mp
#
# --dry-run prints the commands instead of running them. PYTHON picks the interpreter.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  -n, --num-processes N        processes to start (default 2)
  --devices-per-process D      simulated CPU devices per process (default 2)
  --port P                     coordinator port on 127.0.0.1 (default: a free one)
  --mesh M                     data,fsdp,tensor for the check (default 1,-1,1: FSDP)
  --workdir DIR                logs and checksums (default: a new temporary directory)
  --dry-run                    print what would run
  -- ARGS...                   run 'python -m jigsaw_jax.main ARGS' instead of the check
EOF
}

NUM=2
DEVICES=2
PORT=""
MESH="1,-1,1"
WORKDIR=""
DRY_RUN="${DRY_RUN:-0}"
MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) NUM="$2"; shift 2 ;;
    --devices-per-process) DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --mesh) MESH="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
if [[ -z "$PORT" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    PORT=12355
  else
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
if [[ -z "$WORKDIR" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then WORKDIR=/tmp/jigsaw_multiprocess; else WORKDIR="$(mktemp -d)"; fi
fi
ADDRESS="127.0.0.1:${PORT}"
ENV=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES}")

build_command() {  # sets CMD to the command of process $1
  local i="$1"
  if [[ ${#MAIN_ARGS[@]} -gt 0 ]]; then
    CMD=("${ENV[@]}" "$PYTHON" -m jigsaw_jax.main "${MAIN_ARGS[@]}"
         "--config.distributed.coordinator_address=${ADDRESS}"
         "--config.distributed.num_processes=${NUM}" "--config.distributed.process_id=${i}")
  else
    CMD=("${ENV[@]}" "$PYTHON" -m jigsaw_jax.tools.scale_check
         "--coordinator_address=${ADDRESS}" "--num_processes=${NUM}" "--process_id=${i}"
         "--mesh=${MESH}" "--out=${WORKDIR}/process_${i}")
  fi
}
show() {  # the words of a command, shell-quoted where needed
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then out+=("$word"); else out+=("$(printf '%q' "$word")"); fi
  done
  echo "${out[*]}"
}
REFERENCE=(env JAX_PLATFORMS=cpu "$PYTHON" -m jigsaw_jax.tools.scale_check --single_device
           "--out=${WORKDIR}/single_device")
COMPARE=("$PYTHON" -m jigsaw_jax.tools.scale_check --reference "${WORKDIR}/single_device.json"
         --compare)
for ((i = 0; i < NUM; i++)); do COMPARE+=("${WORKDIR}/process_${i}.json"); done

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# ${NUM} processes x ${DEVICES} CPU devices, coordinator ${ADDRESS}, logs in ${WORKDIR}"
  for ((i = 0; i < NUM; i++)); do
    build_command "$i"
    echo "$(show "${CMD[@]}") > ${WORKDIR}/process_${i}.log 2>&1 &"
  done
  if [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
    echo "$(show "${REFERENCE[@]}") > ${WORKDIR}/single_device.log 2>&1"
    echo "wait"
    show "${COMPARE[@]}"
  else
    echo "wait"
  fi
  exit 0
fi

mkdir -p "$WORKDIR"
PIDS=()
cleanup() {  # stop the processes this script started, if any is still running
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
for ((i = 0; i < NUM; i++)); do
  build_command "$i"
  "${CMD[@]}" > "${WORKDIR}/process_${i}.log" 2>&1 &
  PIDS+=("$!")
done
echo "started ${NUM} processes (pids ${PIDS[*]}), coordinator ${ADDRESS}, logs in ${WORKDIR}"
if [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
  "${REFERENCE[@]}" > "${WORKDIR}/single_device.log" 2>&1
fi
STATUS=0
for i in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i failed; the end of its log (${WORKDIR}/process_${i}.log):" >&2
    tail -n 20 "${WORKDIR}/process_${i}.log" >&2
    STATUS=1
  fi
done
PIDS=()
[[ "$STATUS" == 0 ]] || exit "$STATUS"
if [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
  "${COMPARE[@]}"
fi
