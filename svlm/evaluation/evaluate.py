"""Scoring a model: validation loss and perplexity (teacher-forced), and
exact-match answer accuracy on the test split by greedy generation, overall,
per language and per question type (when the test records say them)."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.utils.data import DataLoader, Dataset, Subset

from svlm.benchmarks.run import run_benchmark, table, write_results
from svlm.benchmarks.task import Questions
from svlm.benchmarks.tasks import TASKS
from svlm.config import ConfigError, DataConfig, EvalConfig
from svlm.data.chat import IGNORE, ChatEncoder
from svlm.data.dataset import ChatDataset, Collator, take_bad
from svlm.data.formats import BadSamples, DataError
from svlm.data.source import DataFile, data_root, load_splits, open_dataset, split_file
from svlm.hardware import autocast_for, pick_device
from svlm.inference.generation import generate, prepare_for_decoding
from svlm.model_folder import load_model, resolve_model
from svlm.models.vision import ImageProcessor
from svlm.models.vlm import VLM
from svlm.typed import build


def sum_over_processes(values: list[float]) -> list[float]:
    """Sums of `values` over every process (the values themselves with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def shard(ds, rank: int, world: int):
    """Every world-th sample from rank on: processes share the work, no sample twice."""
    return ds if world == 1 else Subset(ds, range(rank, len(ds), world))


@torch.no_grad()
def validate(model: VLM, loader, autocast, max_batches: int | None = None, bad: BadSamples | None = None) -> dict:
    """Mean loss over supervised tokens, perplexity, token accuracy, and the share
    of samples whose every answer token is predicted right (teacher-forced).
    With several processes each reads its shard (see `shard`) and the sums are
    added up over processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens, correct, exact, samples = 0.0, 0, 0, 0, 0
    for batch in itertools.islice(loader, max_batches):  # not one batch more: its images may not be cached
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        take_bad(batch, bad)  # what a data-loader worker found
        with autocast():
            out = model(batch["input_ids"], batch["pixel_values"], batch["labels"],
                        vision_features=batch.get("vision_features"), target_index=batch.get("target_index"))  # fmt: skip
        n = out.n_tokens
        loss_sum += float(out.ce_loss) * n
        tokens += n
        right = out.logits.argmax(-1) == out.targets  # (N,): at the supervised positions
        B, T = batch["input_ids"].shape
        wrong = torch.zeros(B, dtype=torch.long, device=device)
        wrong.index_add_(0, out.target_index // T, (~right).long())  # (B,): wrong tokens per sample
        correct += int(right.sum())
        exact += int((wrong == 0).sum())
        samples += B
    model.train(was_training)
    loss_sum, tokens, correct, exact, samples = sum_over_processes([loss_sum, tokens, correct, exact, samples])
    loss = loss_sum / max(tokens, 1)
    return {
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 50)),
        "val/token_acc": correct / max(tokens, 1),
        "val/exact": exact / max(samples, 1),
    }


def normalize(text: str) -> str:
    """Lower case, no surrounding space or final punctuation (English and Chinese)."""
    return re.sub(r"[\s.。!！?？,，]+$", "", text.strip().lower())


BLOCK = 256  # prompts whose pictures are loaded at once


@torch.no_grad()
def answer_accuracy(
    model: VLM,
    tokenizer,
    encoder: ChatEncoder,
    ds: ChatDataset,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
    max_answer_tokens: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict, list[dict]]:
    """Greedy answers to the first question of each sample, compared with its
    first answer (exact match after normalising). Samples whose reference
    answer is longer than max_answer_tokens are not scored: exact match means
    little for long answers."""
    device = next(model.parameters()).device
    items = []
    for index in range(len(ds)):
        if limit is not None and len(items) >= limit:
            break
        try:
            ex = ds.example(index)
        except DataError:  # reported where the data set was loaded
            continue
        start = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)  # first answer token
        end = ex.labels.index(encoder.end_id, start) if encoder.end_id in ex.labels[start:] else len(ex.labels)
        if end - start > max_answer_tokens:
            continue
        items.append({"index": index, "ids": ex.input_ids[:start], "reference": tokenizer.decode(ex.labels[start:end])})
    items = items[rank::world]  # each process answers its share
    # Prompts of any lengths decode together (a ragged batch: each row's tokens are those it gets
    # alone), a block at a time so that only a block's pictures are in memory; shortest first, so
    # that a block's prompts are alike in length and its prefills pad little.
    items.sort(key=lambda it: len(it["ids"]))
    for first in range(0, len(items), BLOCK):
        fetched = [(it, ds[it["index"]]) for it in items[first : first + BLOCK]]
        fetched = [(it, f) for it, f in fetched if f is not None]  # an unreadable image: skipped
        views = [f["pixel_values"] for _, f in fetched if f["pixel_values"] is not None]
        pixel_values = torch.cat(views).to(device) if views else None  # each sample's (k, 3, S, S), in order
        outs = generate(model, [it["ids"] for it, _ in fetched], pixel_values, encoder.stop_ids, max_new_tokens,
                        batch_size=batch_size)  # fmt: skip
        for (it, _), out in zip(fetched, outs):
            it["answer"] = tokenizer.decode(out, skip_special_tokens=True)
    predictions = []
    for it in sorted(items, key=lambda it: it["index"]):  # in the data set's order
        if "answer" not in it:
            continue
        ex = ds.example(it["index"])
        question = tokenizer.decode([t for t in it["ids"] if t != encoder.image_id], skip_special_tokens=True)
        predictions.append({
            "index": it["index"], "where": ex.where, "prompt": question.strip(), "reference": it["reference"],
            "answer": it["answer"], "correct": normalize(it["answer"]) == normalize(it["reference"]),
            "keys": ["all"] + [f"{k}/{ex.meta[k]}" for k in ("lang", "type") if k in ex.meta],
        })  # fmt: skip
    if world > 1:  # every process gets every prediction
        gathered = [None] * world
        dist.all_gather_object(gathered, predictions)
        predictions = sorted((p for part in gathered for p in part), key=lambda p: p["index"])
    totals, hits = defaultdict(int), defaultdict(int)
    for p in predictions:
        for k in p.pop("keys"):
            totals[k] += 1
            hits[k] += p["correct"]
    acc = {k: hits[k] / totals[k] for k in sorted(totals)}
    acc["n"] = totals["all"]
    return acc, predictions


def score_benchmark(cfg: EvalConfig, model, tokenizer, folder: Path, device, state) -> dict:
    """eval.py benchmark=<task>: its metrics printed, results.json and predictions.jsonl written."""
    bench = cfg.benchmark
    task = TASKS[bench.name]
    bad = BadSamples()
    prepare_for_decoding(model, cfg.hardware.compile)
    metrics, predictions = run_benchmark(
        model, ChatEncoder.for_model(tokenizer, model), Questions(task, bench.path), bench.limit, bench.max_new_tokens,
        cfg.batch_size, state.process_index, state.num_processes, lambda: autocast_for(cfg.hardware, device), bad,
    )  # fmt: skip
    if state.num_processes > 1:  # every process leaves the group together
        state.wait_for_everyone()
        dist.destroy_process_group()
    if state.is_main_process:
        write_results(Path(cfg.paths.run_dir), task, bench.path, metrics, predictions)
        print(table(task, metrics, len(predictions)))
        if bad.total:
            print(bad.summary())
        print(f"results: {Path(cfg.paths.run_dir) / 'results.json'}")
    return {"model": str(folder), "benchmark": task.name, "questions": len(predictions), **metrics}


def evaluate(cfg: EvalConfig) -> dict:
    """Score a model; launched with several processes (accelerate launch, torchrun),
    the processes share the samples and gather the results."""
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    device = pick_device(cfg.hardware)
    state = PartialState(cpu=device.type == "cpu")  # joins the process group when launched distributed
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    device = state.device if world > 1 else device
    model, tokenizer, meta = load_model(folder, device)
    if main:
        print(f"evaluating {folder} ({meta.get('stage')}, model {meta.get('model')}) on {world} process(es)")
    if cfg.benchmark is not None:
        return score_benchmark(cfg, model, tokenizer, folder, device, state)
    data_cfg = cfg.data
    if data_cfg is None:  # score on the data set the model was trained for
        if "data_config" not in meta:
            raise ConfigError(
                f"{folder}/svlm.json does not say which data the model was trained on: pass data=<option>"
            )
        data_cfg = build(DataConfig, meta["data_config"], "data")
    root = data_root(data_cfg, cfg.paths.cache)
    encoder = ChatEncoder.for_model(tokenizer, model)
    processor = ImageProcessor(model.cfg.vision)
    max_len = min(data_cfg.max_len, model.cfg.lm.max_seq_len)
    bad = BadSamples()
    results: dict = {"model": str(folder), "stage": meta.get("stage")}

    # Loss and perplexity: the validation split (a file, or the held-out
    # fraction of the training file with the training seed); without one, the
    # whole training file, as the original's `validate` did.
    def read(file: DataFile) -> Dataset:
        return open_dataset(data_cfg, file, encoder, processor, max_len, bad)

    val_file = split_file(data_cfg, root, "val", cfg.task)
    if val_file is not None:
        val_ds = read(val_file)
    else:
        train_ds, val_ds = load_splits(data_cfg, root, cfg.task, encoder, processor, max_len, bad, meta.get("seed", 0))
        val_ds = val_ds or train_ds
    loader = DataLoader(shard(val_ds, rank, world), batch_size=cfg.batch_size, collate_fn=Collator(encoder.pad_id))
    val = validate(model, loader, lambda: autocast_for(cfg.hardware, device), None if cfg.steps < 0 else cfg.steps, bad)
    results.update({"val_loss": val["val/loss"], "val_ppl": val["val/ppl"], "val_token_acc": val["val/token_acc"]})

    # Answer accuracy: the test file when there is one, else the validation samples.
    test_file = split_file(data_cfg, root, "test", cfg.task)
    scored = read(test_file) if test_file else val_ds
    prepare_for_decoding(model, cfg.hardware.compile)  # after the loss: its batched matmuls keep the training layout
    with autocast_for(cfg.hardware, device):
        acc, predictions = answer_accuracy(
            model,
            tokenizer,
            encoder,
            scored,
            cfg.batch_size,
            cfg.max_new_tokens,
            cfg.max_test,
            cfg.max_answer_tokens,
            rank,
            world,
        )
    if acc["n"]:
        results["accuracy"] = acc["all"]
        results["accuracy_by"] = acc
    if bad.total:
        results["bad_samples"] = dict(bad.counts)
    if world > 1:  # every process leaves the group together: none exits while another still uses it
        state.wait_for_everyone()
        dist.destroy_process_group()
    if not main:
        return results
    if bad.total:
        print(bad.summary())
    out = Path(cfg.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    for k, v in results.get("accuracy_by", {}).items():
        print(f"  accuracy {k}: {v:.4f}" if k != "n" else f"  questions scored: {v}")
    print(f"accuracy={results.get('accuracy', float('nan')):.4f} val_loss={results['val_loss']:.4f}")
    return results
