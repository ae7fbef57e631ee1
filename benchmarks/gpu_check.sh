#!/usr/bin/env bash
# The GPU checks, in one script: about 5 minutes on one H200, plus at most 5 for row 4.
#
#   bash benchmarks/gpu_check.sh [out_dir]        # default: outputs/gpu_check
#
# 1. Peak GPU memory of training steps under hardware=8gb for model=base and the
#    original's recipe (experiment=svlm, every MoE block trained in stage 2),
#    both stages, at 512 tokens a sample, beside the planner's estimate.
# 2. model=base stage 2 at a full batch (hardware=auto: one micro-batch of 32 x
#    512 tokens, bf16 autocast, fused AdamW), eager and with hardware.compile=true.
# 3. The packed-row attention kernels (flex_attention; flash_attn_varlen_func where
#    flash-attn is installed) against SDPA with the block mask (tests/test_packing.py).
# 4. The continuously batching server on the GPU (benchmarks/serve_load.py, a
#    random-weight model=tiny, hardware=auto): output tokens/s at 1-16 clients
#    and the burst of 64 against serve.max_queue=8.
# Rows 1-2: tokens/s and MFU against a bf16 matmul peak measured in the same run.
# The two full-batch rows are profiled too: where the GPU's time goes is printed
# after the table (profile.txt and trace.json in each run's folder).
# No pretrained weights are needed: the encoder's shape (config.json) is enough,
# the weights are random. Needs hydra-core and omegaconf besides torch,
# transformers and accelerate; row 4 the openai client (pip install -e ".[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1

python - "$out/dinov2-base" <<'EOF'
import sys
from transformers import Dinov2Config
# facebook/dinov2-base's shape
Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
             image_size=518).save_pretrained(sys.argv[1])
EOF

timeout 300 python -m pytest -q tests/test_packing.py -k gpu_kernels -rs > "$out/packing_kernels.log" 2>&1 ||
    echo "packing kernels: failed (see $out/packing_kernels.log)"
tail -3 "$out/packing_kernels.log"

timeout 300 python benchmarks/serve_load.py --random-model --hardware auto --out "$out/serve_load.json" \
    > "$out/serve_load.log" 2>&1 || echo "server load: failed (see $out/serve_load.log)"
tail -12 "$out/serve_load.log"

common=(model.vision.path="$out/dinov2-base" bench.data=false bench.gen_tokens=0 bench.warmup=1 bench.steps=3
        bench.rounds=1)
bench() {  # name, overrides...
    local name=$1
    shift
    timeout 240 python -m svlm.bench "${common[@]}" paths.run_dir="$out/$name" "$@" > "$out/$name.log" 2>&1 ||
        { echo "$name: failed"; tail -5 "$out/$name.log"; }
}
lean=(hardware=8gb bench.batch=8 bench.text_tokens=448)
bench base_stage1_8gb model=base stage=stage1 stage.train_vision=false "${lean[@]}"
bench base_stage2_8gb model=base stage=stage2 "${lean[@]}"
bench svlm_stage1_8gb experiment=svlm stage=stage1 "${lean[@]}"
bench svlm_stage2_8gb experiment=svlm stage=stage2 "${lean[@]}"
full=(hardware=auto bench.batch=32 bench.text_tokens=448 bench.steps=5 bench.profile=true)
bench base_stage2_auto model=base stage=stage2 "${full[@]}"
bench base_stage2_compiled model=base stage=stage2 "${full[@]}" hardware.compile=true

python - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print()
print(f"{'run':<24} {'optimizer':<14} {'batch':>9} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'estimate':>9} "
      f"{'reserved':>9}  under 8 GiB")
for f in sorted(out.glob("*/bench.json"), key=lambda p: p.stat().st_mtime):
    r = json.loads(f.read_text())
    (b,) = r["rounds"].values()
    peak = r["peak_memory_gib"]
    fits = "yes" if peak < 8 else "NO"
    print(f"{f.parent.name:<24} {r['optimizer']:<14} {r['batch']:>4}x{r['tokens_per_sample']:<4} "
          f"{b['tokens_per_s']:>9.0f} {b['mfu']:>6.1%} {peak:>9.2f} {r['estimate_gib']:>9.2f} "
          f"{r['peak_reserved_gib']:>9.2f}  {fits if '8gb' in f.parent.name else '-'}")
print(f"(bf16 matmul peak measured: {b['peak_gflops'] / 1e3:.0f} TFLOP/s on {r['device_name']})")
for f in sorted(out.glob("*/profile.txt"), key=lambda p: p.stat().st_mtime):
    print(f"\n{f.parent.name}: " + "\n".join(f.read_text().splitlines()[:22]))
EOF
