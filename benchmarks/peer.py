"""SVLM beside its peer code base, huggingface/nanoVLM, at the same shapes on
this CPU: training samples/s and batch-1 decoding tokens/s, one code base
against the other, in one run:

    python benchmarks/peer.py                          # both sizes, 1 and 2 threads, 3 rounds
    python benchmarks/peer.py --sizes tiny --threads 1 --rounds 5
    python benchmarks/peer.py --peer ~/src/nanoVLM --json peer.json

nanoVLM runs from its public snapshot, imported and called, never copied: by
default the bare git folder /work/.mirror/huggingface+nanoVLM/repo, whose
models/ and data/ folders are extracted into a temporary folder for the run;
`--peer` names a copy already extracted. Its model is built from its own
VLMConfig with random weights (load_backbone=False: no download). Its model
asks the hub for a tokenizer when it is built (data/processors.py, which also
needs torchvision); the benchmark hands it a stand-in in that module's place,
carrying the only two things the model reads: the image token id and no end
token (so generation never stops early, as stop_ids=-1 does for SVLM).

The shapes are those of `python -m svlm.bench bench.size=tiny|small`, read
from SVLM's own bench model at the start: 224 px images in patches of 14,
256 patches merged 2x2 (pixel shuffle) into 64 visual tokens, 96 text tokens
a sample, vocabulary 8192, fp32, every part trained with AdamW and gradients
clipped to norm 1. nanoVLM gets the same vision width, depth, heads and MLP
width, the same language model width, depth, heads (no GQA), SwiGLU width,
RoPE base and tied head, pixel shuffle factor 2 (64 image tokens) and the
same vocabulary. What stays each code base's own is printed with the table:
the encoder (SVLM's DINOv2 with a CLS token and LayerScale, nanoVLM's
SigLIP-style ViT), the projector (SVLM's norm and two linears, nanoVLM's one
linear), the loss (SVLM computes the head's logits at the supervised
positions only, nanoVLM at every position), the optimizer as each builds it
(SVLM's fused AdamW, nanoVLM's train.py's plain AdamW over three parameter
groups) and the KV cache. nanoVLM's own train.py trains under bf16 autocast;
here both run fp32.

Each measurement is a fresh process, one code base, size and thread count
(torch.set_num_threads): the median of `--steps` training steps (forward,
backward, clipping, optimizer step) after `--warmup` steps, then, on a
freshly built model in eval mode, the best of two greedy batch-1 generations
of `--new-tokens` tokens with the KV cache from one picture and an 8-token
prompt, vision encoding and prefill included. SVLM runs as
`python -m svlm.bench` runs it (svlm.bench.run; decoding after
svlm.inference.generation.decoding_layout); `import svlm` comes before
torch there, so SVLM's OpenMP wait policy is in force. nanoVLM's process
gets the environment as it is; the wait-policy variables each saw are
printed. The order of the two code bases alternates between rounds, and each
round starts with the host state: the 2-thread over 1-thread fp32 matmul
peak (svlm.bench.matmul_peak). The table gives, per size and thread count,
the medians over rounds of each code base's figure and the median of the
rounds' ratios SVLM / nanoVLM (above 1: SVLM is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from paired import once

MIRROR = Path("/work/.mirror/huggingface+nanoVLM/repo")
CODES = ("ours", "peer")

# The host state, and (when asked) the shapes of SVLM's bench models, which nanoVLM's config copies.
HOST = r"""
import contextlib, json, sys, tempfile
spec = json.loads(sys.argv[1])
with contextlib.redirect_stdout(sys.stderr):
    import svlm  # before torch: its wait policy (svlm/openmp.py) must be in force when libgomp loads
    import torch
    from svlm.bench import BenchConfig, build_bench_model, matmul_peak
    from svlm.cli import compose
    from svlm.config import load_train_config
    out = {}
    for t in (1, 2):
        torch.set_num_threads(t)
        out[f"peak_{t}"] = matmul_peak(torch.device("cpu"), torch.float32)
    cfg = load_train_config(compose("train", ["hardware=cpu", f"paths.run_dir={tempfile.mkdtemp()}"]))
    for size in spec["sizes"]:
        model, batch = build_bench_model(cfg, BenchConfig(size=size))
        v, p, lm = model.cfg.vision, model.cfg.projector, model.cfg.lm
        out[size] = {"image_size": v.image_size, "patch": v.patch_size, "vision": [v.hidden_size, v.num_layers, v.num_heads],
                     "vision_mlp": v.hidden_size * v.mlp_ratio, "factor": p.factor, "compress": p.compress,
                     "lm": [lm.d_model, lm.n_layers, lm.n_heads], "kv_heads": lm.n_kv_heads, "d_ff": lm.d_ff,
                     "vocab": lm.vocab_size, "rope_theta": lm.rope_theta, "max_seq_len": lm.max_seq_len,
                     "norm_eps": lm.norm_eps, "tied": lm.tie_embeddings, "image_tokens": model.num_image_tokens,
                     "image_id": model.cfg.image_token_id, "batch": batch, "text_tokens": BenchConfig().text_tokens}
print("@result " + json.dumps(out), flush=True)
"""

OURS = r"""
import contextlib, json, os, sys, tempfile, time
spec = json.loads(sys.argv[1])
with contextlib.redirect_stdout(sys.stderr):
    import svlm  # before torch: its wait policy (svlm/openmp.py) must be in force when libgomp loads
    import torch
    from svlm.bench import BenchConfig, build_bench_model, run, synthetic_batch
    from svlm.cli import compose
    from svlm.config import load_train_config
    from svlm.hardware import THREADS
    from svlm.inference.generation import decoding_layout, generate
    out = {"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}
    t = spec["threads"]
    run_dir = tempfile.mkdtemp(prefix="svlm-peer-")
    cfg = load_train_config(compose("train", ["hardware=cpu", f"paths.run_dir={run_dir}", f"hardware.threads={t}"]))
    bench = BenchConfig(size=spec["size"], threads=[t], rounds=1, steps=spec["steps"], warmup=spec["warmup"],
                        gen_tokens=0, data=False)
    result = run(cfg, bench)
    out["train"], out["params_m"] = result["rounds"][str(t)]["samples_per_s"], result["params_m"]
    THREADS.start(t)
    torch.manual_seed(0)
    model, _ = build_bench_model(cfg, BenchConfig(size=spec["size"]))
    decoding_layout(model.eval())
    batch = synthetic_batch(model, 1, 8, "cpu")
    prompt, pixels = batch["input_ids"][:, : model.num_image_tokens + 8], batch["pixel_values"]
    generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=16)  # warm-up
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=spec["new_tokens"])
        best = max(best, len(ids) / (time.perf_counter() - t0))
    out["decode"], out["new_tokens"], out["threads_seen"] = best, len(ids), torch.get_num_threads()
print("@result " + json.dumps(out), flush=True)
"""

PEER = r"""
import contextlib, json, os, statistics, sys, time, types
spec = json.loads(sys.argv[1])
s = spec["shape"]
with contextlib.redirect_stdout(sys.stderr):
    sys.path.insert(0, spec["peer"])
    # nanoVLM builds its tokenizer from the hub (data/processors.py, which imports torchvision): a
    # stand-in in that module's place gives the model the two things it reads from a tokenizer
    stub = types.ModuleType("data.processors")
    stub.get_tokenizer = lambda *a, **k: types.SimpleNamespace(image_token_id=s["image_id"], eos_token_id=None)
    sys.modules["data.processors"] = stub
    import torch
    from models.config import TrainConfig, VLMConfig
    from models.vision_language_model import VisionLanguageModel
    out = {"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}
    torch.set_num_threads(spec["threads"])
    (vd, vl, vh), (ld, ll, lh) = s["vision"], s["lm"]
    cfg = VLMConfig(vit_hidden_dim=vd, vit_inter_dim=s["vision_mlp"], vit_patch_size=s["patch"],
                    vit_img_size=s["image_size"], vit_n_heads=vh, vit_n_blocks=vl, vit_cls_flag=False,
                    lm_hidden_dim=ld, lm_inter_dim=s["d_ff"], lm_n_heads=lh, lm_n_kv_heads=s["kv_heads"],
                    lm_n_blocks=ll, lm_vocab_size=s["vocab"], lm_re_base=s["rope_theta"], lm_rms_eps=s["norm_eps"],
                    lm_max_position_embeddings=s["max_seq_len"], lm_max_length=s["max_seq_len"],
                    lm_tie_weights=s["tied"], lm_use_tokens=False, mp_pixel_shuffle_factor=s["factor"],
                    mp_image_token_length=s["image_tokens"], vlm_load_backbone_weights=False)

    def build():
        torch.manual_seed(0)
        return VisionLanguageModel(cfg, load_backbone=False)

    def synthetic(batch, text):  # as svlm.bench.synthetic_batch: image slots first, half the text supervised
        n = s["image_tokens"]
        ids = torch.randint(10, s["vocab"], (batch, n + text))
        ids[:, :n] = s["image_id"]
        labels = ids.clone()
        labels[:, : n + text // 2] = -100
        return ids, labels, torch.randn(batch, 3, s["image_size"], s["image_size"])

    model = build().train()
    train = TrainConfig()  # its train.py's optimizer: AdamW over three groups, clipped to max_grad_norm
    groups = [{"params": list(model.MP.parameters()), "lr": train.lr_mp},
              {"params": list(model.vision_encoder.parameters()), "lr": train.lr_vision_backbone},
              {"params": list(model.decoder.parameters()), "lr": train.lr_language_backbone}]
    optimizer = torch.optim.AdamW(groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids, labels, images = synthetic(s["batch"], s["text_tokens"])

    def step():
        t0 = time.perf_counter()
        _, loss = model(ids, images, targets=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0, loss.item()

    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]
    out["train"] = s["batch"] / statistics.median(t for t, _ in times)
    out["loss"], out["params_m"] = times[-1][1], sum(p.numel() for p in model.parameters()) / 1e6
    del model, optimizer, params, groups
    model = build().eval()
    prompt, pixels = ids[:1, : s["image_tokens"] + 8], images[:1]
    model.generate(prompt, pixels, max_new_tokens=16, greedy=True)  # warm-up
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        new = model.generate(prompt, pixels, max_new_tokens=spec["new_tokens"], greedy=True)
        best = max(best, new.shape[1] / (time.perf_counter() - t0))
    out["decode"], out["new_tokens"], out["threads_seen"] = best, new.shape[1], torch.get_num_threads()
print("@result " + json.dumps(out), flush=True)
"""


@contextlib.contextmanager
def peer_folder(given: str | None, git_dir: Path) -> Iterator[tuple[Path, str]]:
    """nanoVLM's code and its commit: `given` as it is, else models/ and data/
    of `git_dir`'s HEAD extracted into a temporary folder (the whole tree
    would not do: the snapshot lacks some pictures' blobs)."""
    if given:
        folder = Path(given).expanduser().resolve()
        if not (folder / "models" / "vision_language_model.py").is_file():
            raise SystemExit(f"--peer {given}: no models/vision_language_model.py there (not a nanoVLM copy)")
        got = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True).stdout.split()  # fmt: skip
        own = len(got) == 2 and Path(got[0]).resolve() == folder  # not the commit of a work tree around it
        yield folder, got[1] if own else "unknown (not a git work tree of its own)"
        return
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nanovlm-") as tmp:
        # git archive complains of the missing blobs even when asked for other folders: its stderr is dropped
        archive = subprocess.Popen(["git", f"--git-dir={git_dir}", "archive", commit, "models", "data"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], stdin=archive.stdout, check=True)
        if archive.wait() or not (Path(tmp) / "models" / "vision_language_model.py").is_file():
            raise RuntimeError(f"could not extract nanoVLM's models/ from {git_dir} (git archive {commit})")
        yield Path(tmp), commit


def measure(code: str, spec: dict, peer: Path) -> dict:
    """One measurement of `code` (ours | peer) at spec's size and thread count."""
    if code == "ours":
        return once(OURS, spec)
    return once(PEER, {**spec, "peer": str(peer)}, cwd=peer)


def one_round(r: int, cells: list[tuple[str, int]], shapes: dict, args, peer: Path) -> dict:
    """Every cell, both code bases back to back, ours first in even rounds."""
    got: dict = {"cells": {}}
    order = CODES[:: -1 if r % 2 else 1]
    for size, threads in cells:
        spec = {"size": size, "threads": threads, "steps": args.steps, "warmup": args.warmup,
                "new_tokens": args.new_tokens, "shape": shapes[size]}  # fmt: skip
        cell = got["cells"][f"{size}/{threads}"] = {code: measure(code, spec, peer) for code in order}
        figures = "  ".join(f"{c} {cell[c]['train']:.2f} samples/s {cell[c]['decode']:.1f} tokens/s" for c in CODES)
        print(f"round {r + 1} {size:<5} {threads} thread(s)  {figures}", flush=True)
    return got


def table(rows: list[dict], cells: list[tuple[str, int]]) -> str:
    """Per size and thread count: medians over rounds, and the median of the rounds' ratios ours / peer."""
    head = f"  {'size':<6}{'threads':>8}" + "".join(f"{h:>12}" for h in ("ours", "peer", "ours/peer") * 2)
    lines = ["\n" + " " * 14 + f"{'train samples/s':^36}{'decode tokens/s':^36}", head]
    for size, threads in cells:
        row = f"  {size:<6}{threads:>8}"
        for kind in ("train", "decode"):
            per = [r["cells"][f"{size}/{threads}"] for r in rows]
            ours, peer = (statistics.median(c[code][kind] for c in per) for code in CODES)
            ratio = statistics.median(c["ours"][kind] / c["peer"][kind] for c in per)
            row += f"{ours:>12.2f}{peer:>12.2f}{ratio:>11.2f}x"
        lines.append(row)
    return "\n".join(lines)


def settings(shapes: dict, rows: list[dict], commit: str) -> str:
    """What both ran, what stays each code base's own, and the environment each process saw."""
    lines = [f"\nnanoVLM at {commit}; shapes of python -m svlm.bench bench.size=<size>, the same in both:"]
    for size, s in shapes.items():
        grid = s["image_size"] // s["patch"]
        lines.append(f"  {size}: {s['image_size']} px, patch {s['patch']} ({grid * grid} patches), vision "
                     f"{'/'.join(map(str, s['vision']))} mlp {s['vision_mlp']}, pixel shuffle {s['factor']} -> "
                     f"{s['image_tokens']} image tokens, LM {'/'.join(map(str, s['lm']))} kv heads {s['kv_heads']} "
                     f"SwiGLU {s['d_ff']}, vocab {s['vocab']}, {s['text_tokens']} text tokens, batch {s['batch']}")  # fmt: skip
    first = rows[0]["cells"]
    for cell, got in first.items():
        lines.append(f"  {cell}: parameters ours {got['ours']['params_m']:.2f}M, peer {got['peer']['params_m']:.2f}M; "
                     f"peer's last training loss {got['peer']['loss']:.2f}; new tokens ours "
                     f"{got['ours']['new_tokens']}, peer {got['peer']['new_tokens']}")  # fmt: skip
    for code in CODES:
        seen = {json.dumps(c[code]["env"]) for r in rows for c in r["cells"].values()}
        lines.append(f"  wait-policy environment seen by {code}: {', '.join(sorted(seen))}")
    lines.append(
        "  not equal: encoder (ours DINOv2: CLS token, 257 tokens, LayerScale; peer SigLIP-style ViT, 256 tokens); "
        "projector (ours LayerNorm + Linear + GELU + Linear, peer one Linear without bias); loss (ours the head at the "
        "supervised positions only, peer at all of them); optimizer (ours fused AdamW, peer torch's default AdamW over "
        "3 groups, as its train.py); KV cache (each its own); peer's train.py would train under bf16 autocast, here fp32"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--threads", default="1,2", help="a comma list of thread counts")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps a measurement")
    ap.add_argument("--warmup", type=int, default=2, help="training steps before the timed ones")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peer", help="an extracted copy of nanoVLM (default: extracted from --peer-git)")
    ap.add_argument("--peer-git", type=Path, default=MIRROR, help="nanoVLM's bare git folder")
    ap.add_argument("--json", help="write every round's figures here")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    cells = [(size, int(t)) for size in sizes for t in args.threads.split(",")]
    rows: list[dict] = []
    shapes: dict = {}
    with peer_folder(args.peer, args.peer_git) as (peer, commit):
        for r in range(args.rounds):
            host = once(HOST, {"sizes": sizes if r == 0 else []})
            shapes = shapes or {s: host[s] for s in sizes}
            state = host["peak_2"] / host["peak_1"]
            print(f"round {r + 1}: host 2-thread / 1-thread matmul peak {state:.2f}x", flush=True)
            rows.append({"host_peak_ratio": state, **one_round(r, cells, shapes, args, peer)})
    peaks = ", ".join(f"{r['host_peak_ratio']:.2f}" for r in rows)
    print(f"\nhost 2-thread / 1-thread matmul peak at each round's start: {peaks}")
    print("training: samples/s, median step; decoding: batch-1 tokens/s with the KV cache, best of 2, prefill included")
    print(table(rows, cells))
    print(settings(shapes, rows, commit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {**vars(args), "peer_git": str(args.peer_git)}, "peer_commit": commit,
                       "shapes": shapes, "rounds": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
