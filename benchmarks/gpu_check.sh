#!/usr/bin/env bash
# One command for a GPU user: the environment, training speed against the plain loop raw_lm.py (with
# and without a CUDA graph, at the default trainer.chunks_per_call and at one chunk per call), fp32 against
# bf16-mixed, eval and greedy generation CPU = GPU, generation speed, the GPU tests (AWD-LSTM's weight drop
# and the minGRU scan among them) and the parallel scan's training speed against cuDNN's GRU and LSTM, in
# one log. About 5 minutes on one NVIDIA H100 (measured before the rows at one chunk per call came).
#
#   benchmarks/gpu_check.sh                        # on a machine with an NVIDIA GPU
#   benchmarks/gpu_check.sh --cpu-dry-run          # every section on the CPU, tiny sizes (tests the plumbing)
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh   # the same
#
# Settings from the environment: RNNLM_DATA_DIR (the corpora; default: the project's data/, where a
# missing corpus is downloaded), RAW_LM (default: ../shared/bench/raw_lm.py from the repository root),
# PYTHON (default: python); GPU_TEST_DEVICE=cpu also runs tests/test_gpu.py's own dry run in the dry run
# (several minutes on 2 cores; without it those tests are skipped on a CPU). rnnlm need not be installed:
# src/ is put first on PYTHONPATH, so the checkout is what runs. Nothing is installed by this script.
# Writes outputs/gpu_check/<timestamp>/: gpu_check.log (everything printed) and each command's files.
# Exit status: 0 every section passed or was skipped, 1 a section failed, 2 it could not start.

# shellcheck disable=SC2317  # the section functions are called through `section`, which shellcheck cannot follow
set -uo pipefail

absolute() {  # a path relative to the folder the command was started in, made absolute; empty stays empty
  if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}
# Paths the user gave keep their meaning after the cd to the repository root below.
RAW_LM=$(absolute "${RAW_LM:-}")
RNNLM_DATA_DIR=$(absolute "${RNNLM_DATA_DIR:-}")
RNNLM_CACHE_DIR=$(absolute "${RNNLM_CACHE_DIR:-}")
[[ ${PYTHON:-} == */* ]] && PYTHON=$(absolute "$PYTHON")  # a path, not a command name
IFS=: read -ra python_path <<<"${PYTHONPATH:-}"
PYTHONPATH=""
for entry in "${python_path[@]}"; do
  PYTHONPATH+="${PYTHONPATH:+:}$(absolute "$entry")"
done
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

DEVICE=${GPU_CHECK_DEVICE:-cuda}
case "${1:-}" in
  "") ;;
  --cpu-dry-run) DEVICE=cpu ;;
  -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "error: unknown argument $1: use --cpu-dry-run, or nothing"; exit 2 ;;
esac
if [[ $DEVICE != cuda && $DEVICE != cpu ]]; then
  echo "error: GPU_CHECK_DEVICE=$DEVICE: use cuda (the default) or cpu (the dry run)"
  exit 2
fi

PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's rnnlm, installed or not
export RNNLM_DATA_DIR=${RNNLM_DATA_DIR:-$PWD/data}      # the project's default: data/ in the repository
export RNNLM_CACHE_DIR=${RNNLM_CACHE_DIR:-$PWD/.cache}  # the project's default: its tokenized corpora
RAW_LM=${RAW_LM:-../shared/bench/raw_lm.py}
SKIP=77  # a section's exit status for "skipped"

# Sizes. The GPU run: 3 PTB word LSTMs (SGD lr 20, clip 0.25), 2 alternating rounds of raw_lm / rnnlm /
# rnnlm with a CUDA graph / both again at one chunk per Lightning call. The dry run: tiny stand-ins of the same shapes, 1 round.
if [[ $DEVICE == cuda ]]; then
  ACCELERATOR=gpu
  SPEED_ROUNDS=2
  SPEED_CONFIGS=(  # name|train_speed.py flags
    "lstm2x200|--size 200 --batch-size 20 --seq-len 35 --steps 300"
    "lstm2x650|--size 650 --batch-size 20 --seq-len 35 --steps 300"
    "lstm2x1500|--size 1500 --batch-size 128 --seq-len 70 --steps 100"
  )
  PRECISION_FLAGS=(--size 650 --batch-size 20 --seq-len 35 --steps 300)
  REFUSALS_OK=()  # on a GPU, a refused CUDA graph is a failure
  SMALL_MODEL=(model.hidden_size=256 model.embedding_dim=64 trainer.max_steps=100)
  GREEDY_TOKENS=300
  GENERATE_SPEED_FLAGS=(--tokens 500 --rounds 3 --no-naive)  # the naive recipe takes ~4 s a text on a GPU
  SCAN_SPEED_FLAGS=(--batch 64 --seq 512 2048 8192 --tokens 262144)
else
  ACCELERATOR=cpu
  SPEED_ROUNDS=1
  SPEED_CONFIGS=(
    "lstm2x200|--size 32 --batch-size 20 --seq-len 35 --steps 30"
    "lstm2x650|--size 48 --batch-size 20 --seq-len 35 --steps 30"
    "lstm2x1500|--size 64 --batch-size 32 --seq-len 70 --steps 20"
  )
  PRECISION_FLAGS=(--size 48 --batch-size 20 --seq-len 35 --steps 30)
  REFUSALS_OK=(--refusals-ok)  # rnnlm refuses a CUDA graph on a CPU: expected here
  SMALL_MODEL=(model.hidden_size=64 model.embedding_dim=32 trainer.max_steps=20)
  GREEDY_TOKENS=100
  GENERATE_SPEED_FLAGS=(--tokens 100 --rounds 1 --no-naive --hidden-size 128)
  SCAN_SPEED_FLAGS=(--quick)
fi

mkdir -p outputs/gpu_check || exit 2
OUT=outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)
for n in 1 2 3 4 5 6 7 8 9; do  # a second check started in the same second gets a folder of its own
  mkdir "$OUT" 2>/dev/null && break
  OUT=${OUT%_[0-9]}_$n
done
[[ -d $OUT ]] || { echo "error: cannot create a folder under outputs/gpu_check"; exit 2; }
LOG=$OUT/gpu_check.log
CKPT=$OUT/train_small/checkpoints/last.ckpt
FAILED=()

section() {  # section TITLE FUNCTION: a header, the function's output, then its outcome
  local title=$1 start=$SECONDS rc
  shift
  printf '\n=== %s ===\n' "$title"
  "$@"
  rc=$?
  case $rc in
    0) echo "--> ok ($((SECONDS - start)) s)" ;;
    "$SKIP") echo "--> skipped" ;;
    *) echo "--> FAILED (exit $rc, $((SECONDS - start)) s)"; FAILED+=("$title") ;;
  esac
}

run() {  # run NAME COMMAND...: show and run it; its stderr goes to $OUT/NAME.stderr, whose end is shown if it fails
  local name=$1 rc
  shift
  echo "\$ $*"
  "$@" 2>"$OUT/$name.stderr"
  rc=$?
  if ((rc != 0)); then
    echo "exit status $rc; the end of its stderr ($OUT/$name.stderr):"
    tail -n 15 "$OUT/$name.stderr" | sed 's/^/    /'
  fi
  return "$rc"
}

check_packages() {  # does this Python have what rnnlm needs? If not: the command that installs it, keeping torch
  "$PYTHON" - <<'EOF'
import importlib
import re
import sys
from pathlib import Path

needed = {"torch": "torch", "lightning": "lightning", "hydra": "hydra-core", "omegaconf": "omegaconf",
          "numpy": "numpy", "yaml": "pyyaml", "rich": "rich", "tensorboard": "tensorboard"}
missing = []
for module, package in needed.items():
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
if "torch" in missing:
    print("error: torch is not installed: install a CUDA build of torch first "
          "(https://pytorch.org/get-started/locally/), then run this again")
    sys.exit(2)
if not missing:
    try:
        import hydra, omegaconf, rnnlm, rnnlm.commands.eval, rnnlm.commands.generate, rnnlm.commands.train  # noqa: E401, F401
    except ImportError as err:
        print(f"error: rnnlm does not import: {err}")
        sys.exit(2)
    sys.exit(0)
import torch

# the project's own version bounds, as pyproject.toml gives them
specs = {m[1].lower(): m[0] for m in re.findall(r'"(([A-Za-z0-9_.-]+)\s*[<>=!~][^"]*)"', Path("pyproject.toml").read_text())}
wanted = " ".join(f"'{specs.get(p, p)}'" for p in missing)
print(f"error: {sys.executable} (torch {torch.__version__}) lacks {', '.join(missing)}, which rnnlm needs.")
print("Install them and rnnlm without touching the installed torch:")
print(f"    {sys.executable} -m pip install --no-deps -e . && {sys.executable} -m pip install {wanted}")
if torch.__version__ >= "2.3":
    print(f"(`pip install -e .` keeps it too: torch {torch.__version__} already satisfies torch>=2.3.)")
else:
    print(f"(not `pip install -e .`: it would replace torch {torch.__version__}, below the torch>=2.3 it asks for.)")
print("Or without installing: PYTHONPATH=src:/folder/with/hydra/omegaconf/antlr4 benchmarks/gpu_check.sh")
sys.exit(2)
EOF
}

check_gpu() {
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && return 0
  "$PYTHON" -c "import torch; print(f'error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: \
install a CUDA build of torch, check nvidia-smi and CUDA_VISIBLE_DEVICES; or run the CPU dry run: \
benchmarks/gpu_check.sh --cpu-dry-run')"
  return 2
}

environment() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | sed 's/^/nvidia-smi  GPU /'
    nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | sed 's/^/nvidia-smi  driver /'
  else
    echo "nvidia-smi  not found"
  fi
  "$PYTHON" - <<'EOF'
import os
import platform
import sys

import hydra
import lightning
import omegaconf
import torch

print(f"python      {platform.python_version()} ({sys.executable})")
print(f"torch       {torch.__version__} (built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
print(f"lightning   {lightning.__version__}")
print(f"hydra-core  {hydra.__version__}, omegaconf {omegaconf.__version__}")
usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
print(f"CPUs        {os.cpu_count()} ({usable} usable), {platform.processor() or platform.machine()}, "
      f"torch threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}      {torch.cuda.get_device_name(i)}, compute capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.1f} GiB")
    print(f"TF32        matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
else:
    print("GPU         none visible to torch")
EOF
  local rc=$?
  if git rev-parse --git-dir >/dev/null 2>&1; then
    echo "checkout    $(git rev-parse HEAD) ($(git status --porcelain | wc -l) files changed or untracked)"
  else
    echo "checkout    not a git checkout"
  fi
  echo "data        $RNNLM_DATA_DIR"
  return "$rc"
}

speed_table() {
  if [[ ! -f $RAW_LM ]]; then
    echo "raw_lm.py not found at $RAW_LM: the speed table is skipped (set RAW_LM=/path/to/raw_lm.py)"
    return "$SKIP"
  fi
  local config name flags rc=0 jsons=()
  for config in "${SPEED_CONFIGS[@]}"; do
    name=${config%%|*}
    read -ra flags <<<"${config#*|}"
    printf '\n--- %s\n' "$name"
    run "speed_$name" "$PYTHON" benchmarks/train_speed.py --device "$DEVICE" --raw "$RAW_LM" \
      --data-dir "$RNNLM_DATA_DIR" "${flags[@]}" --rounds "$SPEED_ROUNDS" --variant model.cuda_graph=true \
      --variant trainer.chunks_per_call=1 --variant "trainer.chunks_per_call=1 model.cuda_graph=true" \
      "${REFUSALS_OK[@]}" --cache-dir "$RNNLM_CACHE_DIR" --out "$OUT/speed/$name" --json "$OUT/speed/$name.json" || rc=1
    jsons+=("$OUT/speed/$name.json")
  done
  printf '\n--- tokens/s: raw_lm.py median step, rnnlm median step and wall clock; medians of %s rounds\n' \
    "$SPEED_ROUNDS"
  "$PYTHON" benchmarks/train_speed.py --table "${jsons[@]}" || rc=1
  return "$rc"
}

precision() {
  run precision "$PYTHON" benchmarks/train_speed.py --device "$DEVICE" --data-dir "$RNNLM_DATA_DIR" --no-raw \
    "${PRECISION_FLAGS[@]}" --rounds "$SPEED_ROUNDS" --variant trainer.precision=bf16-mixed \
    --cache-dir "$RNNLM_CACHE_DIR" --out "$OUT/precision" --json "$OUT/precision.json"
}

eval_cpu_gpu() {
  run train_small "$PYTHON" src/train.py data=char "${SMALL_MODEL[@]}" "trainer.accelerator=$ACCELERATOR" \
    trainer.limit_val_batches=10 trainer.num_sanity_val_steps=0 test=false \
    "~callbacks.progress_bar" trainer.enable_progress_bar=false "hydra.run.dir=$OUT/train_small" >/dev/null ||
    return 1
  [[ -f $CKPT ]] || { echo "training ended without $CKPT"; return 1; }
  echo "trained: $CKPT"
  local side device
  for side in cpu gpu; do  # in the dry run, the "gpu" side is the CPU too
    if [[ $side == cpu ]]; then device=cpu; else device=$DEVICE; fi
    run "eval_$side" "$PYTHON" src/eval.py "ckpt_path=$CKPT" "device=$device" "output=$OUT/eval_$side.json" \
      "hydra.run.dir=$OUT/eval_$side" || return 1
  done
  "$PYTHON" - "$OUT/eval_cpu.json" "$OUT/eval_gpu.json" "$DEVICE" <<'EOF'
import json
import sys

TOLERANCE = 1e-3  # nats; cuDNN may use TF32 on the GPU
cpu, gpu = (json.load(open(path)) for path in sys.argv[1:3])
diff = abs(cpu["loss"] - gpu["loss"])
print(f"loss on cpu {cpu['loss']:.6f} | on {sys.argv[3]} {gpu['loss']:.6f} | "
      f"difference {diff:.2e} nats (tolerance {TOLERANCE:g}) | tokens {cpu['tokens']:,} and {gpu['tokens']:,}")
sys.exit(0 if diff <= TOLERANCE and cpu["tokens"] == gpu["tokens"] else 1)
EOF
}

greedy_cpu_gpu() {
  [[ -f $CKPT ]] || { echo "no checkpoint: the training of the section before failed"; return 1; }
  local side device
  for side in cpu gpu; do
    if [[ $side == cpu ]]; then device=cpu; else device=$DEVICE; fi
    run "greedy_$side" "$PYTHON" src/generate.py "ckpt_path=$CKPT" greedy=true "max_new_tokens=$GREEDY_TOKENS" \
      prompt=ROMEO: "device=$device" "output=$OUT/greedy_$side.txt" >/dev/null || return 1
  done
  echo "the text on cpu begins: $(head -c 120 "$OUT/greedy_cpu.txt" | tr '\n' ' ')"
  if cmp -s "$OUT/greedy_cpu.txt" "$OUT/greedy_gpu.txt"; then
    echo "greedy tokens identical on cpu and $DEVICE ($GREEDY_TOKENS new tokens)"
  else
    echo "greedy tokens DIFFER between cpu and $DEVICE: $(cmp "$OUT/greedy_cpu.txt" "$OUT/greedy_gpu.txt")"
    return 1
  fi
}

generate_speed() {
  run generate_speed "$PYTHON" benchmarks/generate_speed.py --device "$DEVICE" --samples 1 16 \
    "${GENERATE_SPEED_FLAGS[@]}"
}

scan_speed() {
  run scan_speed "$PYTHON" benchmarks/scan_speed.py --device "$DEVICE" "${SCAN_SPEED_FLAGS[@]}"
}

gpu_tests() {
  if [[ ! -f tests/test_gpu.py ]]; then
    echo "tests/test_gpu.py is absent: no GPU tests to run"
    return "$SKIP"
  fi
  run pytest_gpu "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py tests/test_cuda_graph.py
}

main() {
  echo "gpu_check: $(date '+%Y-%m-%d %H:%M:%S') | device $DEVICE$([[ $DEVICE == cpu ]] && echo ' (CPU dry run)')" \
    "| output $OUT"
  check_packages || exit 2
  if [[ $DEVICE == cuda ]]; then check_gpu || exit 2; fi
  section "1. Environment" environment
  section "2. Training speed: rnnlm against raw_lm.py, with and without a CUDA graph, 16 and 1 chunks per call" speed_table
  section "3. fp32 against bf16-mixed: speed and final training loss" precision
  section "4. Eval: the same loss on the CPU and on $DEVICE" eval_cpu_gpu
  section "5. Greedy generation: the same tokens on the CPU and on $DEVICE" greedy_cpu_gpu
  section "6. Generation speed on $DEVICE, 1 and 16 samples" generate_speed
  section "7. GPU tests: pytest -m gpu tests/test_gpu.py tests/test_cuda_graph.py" gpu_tests
  section "8. Training speed of minGRU/minLSTM's parallel scan against GRU/LSTM on $DEVICE" scan_speed
  echo
  if ((${#FAILED[@]})); then
    echo "FAILED: ${#FAILED[@]} section(s): $(printf '%s; ' "${FAILED[@]}")"
  else
    echo "all sections passed or were skipped"
  fi
  echo "total wall time: $((SECONDS / 60)) min $((SECONDS % 60)) s | log: $LOG"
  ((${#FAILED[@]} == 0))
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
