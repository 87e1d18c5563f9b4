#!/usr/bin/env bash
# The first run on a GPU machine, prepared: what the CPU tests cannot show. Run from a copy of the repository:
#
#     bash bench/gpu_check.sh            # about 10 minutes on one H200-class GPU, setup included
#
# It sets up .venv and the demo model (make setup demo-model), then measures: the environment (GPU, CUDA, torch,
# bitsandbytes) and auto precision's choice; LoRA and QLoRA training of SmolLM2 against plain TRL in the same run
# (tokens/s, peak GPU memory); FSDP on the GPUs present (two or more); a resume; merge; GGUF; the server answering
# the openai client. Each step's figures, or "skipped: why" / "failed: ..." with the end of its output, go to
# bench/results/gpu_check-DATE.md; a step that fails does not stop the others. Exit status: the number of failed steps.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
WORK=work_dirs/gpu_check
STEPS=${GPU_CHECK_STEPS:-30}            # timed training steps per run (a warm-up step comes first)
OUT=bench/results/gpu_check-$(date -u +%Y-%m-%d).md
mkdir -p bench/results "$WORK"
FAILED=0

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "\`bash bench/gpu_check.sh\` on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
} > "$OUT"

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit; its stdout is the section's figures.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log" start=$SECONDS
  echo "== $name" >&2
  { echo "## $name"; echo; } >> "$OUT"
  if timeout "$limit" "$@" > "$log.out" 2> "$log"; then
    cat "$log.out" >> "$OUT"
    { echo; echo "($((SECONDS - start)) s)"; echo; } >> "$OUT"
  else
    local rc=$?
    FAILED=$((FAILED + 1))
    {
      cat "$log.out"
      echo
      [ "$rc" -eq 124 ] && echo "failed: over its limit of $limit s" || echo "failed: exit status $rc"
      echo; echo '```'; tail -n 15 "$log"; echo '```'; echo
    } >> "$OUT"
  fi
}

skip() {
  { echo "## $1"; echo; echo "skipped: $2"; echo; } >> "$OUT"
}

step "Setup (make setup demo-model)" 300 make setup demo-model
if [ ! -x "$PY" ] || [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then
  skip "Everything else" "no .venv or demo model (see the setup step)"
  echo "results: $OUT" >&2
  exit 1
fi

if command -v nvidia-smi > /dev/null; then
  step "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
else
  skip "nvidia-smi" "not on PATH"
fi
step "Environment and auto precision" 60 "$PY" bench/gpu_check.py env
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -lt 1 ]; then
  skip "Training, FSDP, resume, merge, GGUF, server" "torch sees no CUDA device"
  echo "results: $OUT" >&2
  exit $((FAILED + 1))
fi

step "Training: train.py against plain TRL ($STEPS timed steps each)" 240 \
  "$PY" bench/gpu_check.py train "$WORK/bench" "$STEPS"

# The demo recipe on the GPU, shortened; evaluation prompts off where the weights are sharded (recipe check).
RUN=(recipes/demo_smollm2.yaml train.max_steps=20 train.save_steps=10 train.logging_steps=5 data.eval_path=null)
if [ "$GPUS" -ge 2 ]; then
  step "FSDP (full_shard) on $GPUS GPUs" 180 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" \
    train.py "${RUN[@]}" train.fsdp=full_shard evaluation.prompts=[] train.output_dir="$WORK/fsdp" --force
  [ -f "$WORK/fsdp/train.log" ] && grep -E "effective batch|step 20/|done" "$WORK/fsdp/train.log" >> "$OUT"
else
  skip "FSDP" "one GPU here (FSDP needs two or more; its CPU part is tests/test_distributed.py)"
fi

step "Resume: 20 steps whole, then again from checkpoint-10" 180 bash -c "
  $PY train.py ${RUN[*]} train.output_dir=$WORK/whole --force > /dev/null &&
  rm -rf $WORK/whole-final && cp -r $WORK/whole/final $WORK/whole-final &&
  $PY train.py ${RUN[*]} train.output_dir=$WORK/whole --resume $WORK/whole/checkpoint-10 > /dev/null &&
  grep -E 'precision|fast paths|step 20/' $WORK/whole/train.log | tail -n 4 &&
  $PY bench/gpu_check.py same $WORK/whole-final $WORK/whole/final"
step "Merge with logit check, GGUF q8_0" 120 "$PY" merge.py "$WORK/whole/final" --verify --gguf q8_0 --force
step "Server: chat.py --serve, asked by the openai client" 180 "$PY" bench/gpu_check.py serve "$WORK/whole/merged" 8765 "$WORK/serve.log"

echo "results: $OUT ($FAILED failed)" >&2
exit "$FAILED"
