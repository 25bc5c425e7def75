#!/usr/bin/env bash
# The GPU paths on the default world, on a machine with one CUDA GPU (CI has none):
#   per-block GRPO with trainer=gpu (fp32 and bf16-mixed; the in-process target follows the
#   scorer with target.device=auto), rollout=generation on the GPU, task=decode on cuda against
#   the same decode on the CPU (the loop, with and without the row cache), and the fast tests on a
#   machine where torch.cuda.is_available() is true.
#   bash bench/gpu_paths.sh OUT_DIR      # logs, decode comparison and summaries land in OUT_DIR
# The jobs run side by side (one GPU; 4 CPU threads a run, 8 test workers); each has its own time
# limit, so the whole script ends within about 5 minutes.
set -u
OUT=${1:?usage: bash bench/gpu_paths.sh OUT_DIR}
RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=4
mkdir -p "$OUT"

{
  nvidia-smi -L
  python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1

train() {  # NAME LIMIT_S OVERRIDES...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 run.py trainer=gpu hydra.run.dir="$RUNS/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$OUT/summaries.txt"
}

decode() {  # NAME DEVICE OVERRIDES...
  local name=$1 device=$2
  shift 2
  timeout 120 python3 run.py task=decode ckpt_path="$RUNS/block/checkpoints/last.ckpt" decode.device="$device" \
    'decode.policies=[greedy,standard_sd,scorer,accept_all,kl_below]' decode.kl_threshold=1.0 \
    hydra.run.dir="$RUNS/$name" "$@" >> "$OUT/decode.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$OUT/summaries.txt"
}

(
  train block 150
  decode decode_cpu cpu
  decode decode_cuda cuda
  decode decode_cuda_cached cuda decode.kv_cache=true
) &
(
  # The zero-cost judge (task=judge trains it on the CPU), then decoded with on either device.
  timeout 120 python3 run.py task=judge hydra.run.dir="$RUNS/judge" >> "$OUT/decode.log" 2>&1
  echo "judge rc=$? $(date +%T)" >> "$OUT/summaries.txt"
  for device in cpu cuda; do
    timeout 120 python3 run.py task=decode decode.device=$device 'decode.policies=[standard_sd,judge]' \
      decode.judge_path="$RUNS/judge/judge_grpo.pt" hydra.run.dir="$RUNS/judge_decode_$device" >> "$OUT/decode.log" 2>&1
    echo "judge_decode_$device rc=$? $(date +%T)" >> "$OUT/summaries.txt"
  done
) &
train bf16 150 trainer.precision=bf16-mixed &
train generation 200 rollout=generation loss.ppo_epochs=2 trainer.max_steps=8 trainer.val_check_interval=2 &
# The zero-cost judge's head on the GPU, its frozen models (model.device) and feature cache on the CPU.
train generation_judge 200 rollout=generation model=judge trainer.max_steps=4 trainer.val_check_interval=2 &
(
  # pytest-xdist (-n) where it is installed; the wandb logger tests need wandb, which may be absent.
  OMP_NUM_THREADS=1 timeout 270 python3 -m pytest -q -n 8 -m "not slow" -p no:cacheprovider \
    --ignore=tests/training/test_loggers.py tests > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? $(date +%T)" >> "$OUT/summaries.txt"
) &
wait

python3 - "$RUNS" >> "$OUT/summaries.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
for name in ("block", "bf16", "generation", "generation_judge"):
    path = runs / name / "summary.json"
    print(name, json.dumps(json.loads(path.read_text()), sort_keys=True) if path.is_file() else "no summary.json")
samples = {}
for name in ("decode_cpu", "decode_cuda", "decode_cuda_cached", "judge_decode_cpu", "judge_decode_cuda"):
    path = runs / name / "decode_samples.jsonl"
    if path.is_file():
        samples[name] = [json.loads(line) for line in path.open()]
        print(name, json.dumps(json.loads((runs / name / "decode.json").read_text()), sort_keys=True))
for base_name, name in (("decode_cpu", "decode_cuda"), ("decode_cpu", "decode_cuda_cached"),
                        ("judge_decode_cpu", "judge_decode_cuda")):
    base, rows = samples.get(base_name), samples.get(name)
    for policy in (rows[0].keys() - {"index", "prompt", "reference"}) if base and rows else ():
        same = sum(a[policy]["response"] == b[policy]["response"] for a, b in zip(base, rows))
        print(f"{name} vs {base_name}, {policy}: {same}/{len(rows)} responses identical")
EOF
