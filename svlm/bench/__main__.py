"""`python -m svlm.bench [train.py overrides] [bench.*]`: the benchmark's command
(settings: conf/bench.yaml; the benchmark: svlm/bench/__init__.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

import svlm.bench
from svlm.bench import BenchConfig, run
from svlm.cli import command


def print_table(r: dict) -> None:
    print(f"{r['model']} ({r['stage']}) on {r['device_name']}, hardware={r['hardware']}: batch {r['batch']} "
          f"(micro-batch {r['micro_batch']}) x {r['tokens_per_sample']} tokens, {r['precision']}, {r['optimizer']}"
          f"{', checkpointing' if r['grad_checkpointing'] else ''}{', compiled' if r['compile'] else ''}; "
          f"{r['params_m']:.1f}M parameters ({r['trained_params_m']:.1f}M trained), "
          f"{r['step_gflop']:.1f} GFLOP a step")  # fmt: skip
    print(
        f"  {'threads':>7} {'step s':>8} {'samples/s':>10} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'MFU':>6}"
    )
    for threads, b in r["rounds"].items():
        print(f"  {threads:>7} {b['step_s']:>8.3f} {b['samples_per_s']:>10.1f} {b['tokens_per_s']:>10.0f} "
              f"{b['achieved_gflops']:>9.1f} {b['peak_gflops']:>13.1f} {b['mfu']:>6.1%}")  # fmt: skip
    if "generation_tokens_per_s" in r:
        g = r["generation_tokens_per_s"]
        without = f", {g['without_cache']:.0f} without ({g['speedup']:.1f}x)" if "without_cache" in g else ""
        print(f"  generation ({g['new_tokens']} new tokens): {g['with_cache']:.0f} tokens/s with the KV cache{without}")
    if "data_images_per_s" in r:
        print(f"  data pipeline: {r['data_images_per_s']:.0f} images/s")
    if "padding_share" in r:
        p = r["padding_share"]
        low, mid, high = p["sample_tokens"]
        packed = "end to end" if p["end_to_end"] else "in rows of data.max_len"
        print(f"  padding: {p['unpacked']:.1%} of batch tokens a row a sample, {p['packed']:.1%} packed {packed} "
              f"(data.packing); "
              f"samples of {low} to {high} tokens (median {mid:.0f})")  # fmt: skip
    for name, d in r.get("data_steps", {}).items():
        print(f"  training on the data, {name}: {d['samples_per_s']:.2f} samples/s ({d['samples']} samples in "
              f"{d['rows']} rows of {d['tokens_per_row']:.0f} tokens on average)")  # fmt: skip
    if "profile" in r:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["profile"]["phases"].items())
        print(f"  profile: {shares} of the step; top operators in {r['profile']['table']}")
    mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
    print(f"  peak memory: {mem:.2f} GiB ({'GPU allocated' if 'peak_memory_gib' in r else 'process RSS'}); "
          f"estimate (python -m svlm.memory): {r['estimate_gib']:.2f} GiB")  # fmt: skip


@command("bench", doc=svlm.bench.__doc__)
def main(cfg: DictConfig) -> None:
    from svlm.config import load_train_config
    from svlm.typed import build

    with open_dict(cfg):
        bench = build(BenchConfig, OmegaConf.to_container(cfg.pop("bench"), resolve=True), "bench")
    train_cfg = load_train_config(cfg)
    results = run(train_cfg, bench)
    print_table(results)
    out = Path(train_cfg.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"figures: {out / 'bench.json'}")


if __name__ == "__main__":
    sys.exit(main())
