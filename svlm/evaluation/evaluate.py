"""Scoring a model (what eval.py runs): validation loss and perplexity
(teacher-forced), and exact-match answer accuracy by greedy generation on the
test split and each of data.test_sets, overall, per language and per question
type (svlm/evaluation/answers.py), beside what the model scores with a blank
picture and what the majority answer of each type scores
(svlm/evaluation/baselines.py). Or, with benchmark=<task>, a standard
benchmark (svlm/benchmarks/)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.utils.data import DataLoader, Dataset, Subset

from svlm.benchmarks.run import run_benchmark, table, write_results
from svlm.benchmarks.task import Questions
from svlm.benchmarks.tasks import TASKS
from svlm.config import ConfigError, DataConfig, EvalConfig
from svlm.data.chat import ChatEncoder
from svlm.data.dataset import Collator, take_bad
from svlm.data.formats import BadSamples, read_records
from svlm.data.source import LAZY_BYTES, DataFile, data_file, data_root, load_splits, open_dataset, split_file
from svlm.evaluation.answers import accuracy, answer_questions
from svlm.evaluation.baselines import Majority, majority_answers, majority_correct
from svlm.hardware import autocast_for, pick_device
from svlm.inference.generation import prepare_for_decoding
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


def eval_data(cfg: EvalConfig, folder: Path, meta: dict) -> DataConfig:
    """The data to score on: data=<option>, or the data the model was trained on
    (its svlm.json) with any data.<key>= overrides (cfg.data_overlay) on top."""
    if cfg.data is not None:
        return cfg.data
    if "data_config" not in meta:
        raise ConfigError(f"{folder}/svlm.json does not say which data the model was trained on: pass data=<option>")
    return build(DataConfig, {**meta["data_config"], **cfg.data_overlay}, "data")


def majority_of(data_cfg: DataConfig, root: Path, task: str) -> Majority:
    """The majority answers of the training file (none for tables or large files)."""
    try:
        train = split_file(data_cfg, root, "train", task)
    except ConfigError:
        return {}
    if train is None or train.is_table or not train.path.is_file() or train.path.stat().st_size > LAZY_BYTES:
        return {}
    return majority_answers(read_records(train.path, on_error="skip", fmt=train.fmt))


def score_questions(cfg: EvalConfig, model, tokenizer, encoder, ds, majority: Majority, state) -> tuple[dict, list]:
    """Accuracy on a test set's questions, with the blind and majority figures beside it."""
    predictions = answer_questions(model, tokenizer, encoder, ds, cfg.batch_size, cfg.max_new_tokens, cfg.max_test,
                                   cfg.max_answer_tokens, state.process_index, state.num_processes, cfg.blind)  # fmt: skip
    for p in predictions:
        p["majority_correct"] = majority_correct(p, majority)
    scores = {"accuracy_by": accuracy(predictions)}
    scores["accuracy"] = scores["accuracy_by"].get("all", float("nan"))
    if cfg.blind:
        scores["blind_by"] = accuracy(predictions, "blind_correct")
    if majority:
        scores["majority_by"] = accuracy(predictions, "majority_correct")
    return scores, predictions


def evaluate(cfg: EvalConfig) -> dict:
    """Score a model; launched with several processes (accelerate launch, torchrun),
    the processes share the samples and gather the results."""
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    device = pick_device(cfg.hardware)
    state = PartialState(cpu=device.type == "cpu")  # joins the process group when launched distributed
    device = state.device if state.num_processes > 1 else device
    model, tokenizer, meta = load_model(folder, device)
    if state.is_main_process:
        print(
            f"evaluating {folder} ({meta.get('stage')}, model {meta.get('model')}) on {state.num_processes} process(es)"
        )
    if cfg.benchmark is not None:
        return score_benchmark(cfg, model, tokenizer, folder, device, state)
    data_cfg = eval_data(cfg, folder, meta)
    root = data_root(data_cfg, cfg.paths.cache)
    encoder = ChatEncoder.for_model(tokenizer, model)
    bad = BadSamples()
    reader = Reader(data_cfg, root, encoder, ImageProcessor(model.cfg.vision),
                    min(data_cfg.max_len, model.cfg.lm.max_seq_len), bad)  # fmt: skip
    results: dict = {"model": str(folder), "stage": meta.get("stage")}
    val_ds = reader.validation(cfg.task, meta.get("seed", 0))
    loader = DataLoader(shard(val_ds, state.process_index, state.num_processes), batch_size=cfg.batch_size,
                        collate_fn=Collator(encoder.pad_id))  # fmt: skip
    val = validate(model, loader, lambda: autocast_for(cfg.hardware, device), None if cfg.steps < 0 else cfg.steps, bad)
    results.update({"val_loss": val["val/loss"], "val_ppl": val["val/ppl"], "val_token_acc": val["val/token_acc"]})

    # Answer accuracy: the test file when there is one, else the validation samples; then data.test_sets.
    test_file = split_file(data_cfg, root, "test", cfg.task)
    tests = {"test": reader.read(test_file) if test_file else val_ds}
    for name, file in data_cfg.test_sets.items():
        tests[name] = reader.read(reader.test_set(name, file, cfg.task))
    majority = majority_of(data_cfg, root, cfg.task)
    prepare_for_decoding(model, cfg.hardware.compile)  # after the loss: its batched matmuls keep the training layout
    predictions = {}
    with autocast_for(cfg.hardware, device):
        for name, ds in tests.items():
            scores, predictions[name] = score_questions(cfg, model, tokenizer, encoder, ds, majority, state)
            if scores["accuracy_by"]["n"]:
                if name == "test":
                    results.update(scores)
                else:
                    results.setdefault("test_sets", {})[name] = scores
    if bad.total:
        results["bad_samples"] = dict(bad.counts)
    if state.num_processes > 1:  # every process leaves the group together: none exits while another still uses it
        state.wait_for_everyone()
        dist.destroy_process_group()
    if state.is_main_process:
        report(results, predictions, bad, Path(cfg.paths.run_dir))
    return results


@dataclass
class Reader:
    """How eval.py opens the data's files."""

    data: DataConfig
    root: Path
    encoder: ChatEncoder
    processor: ImageProcessor
    max_len: int
    bad: BadSamples

    def read(self, file: DataFile) -> Dataset:
        return open_dataset(self.data, file, self.encoder, self.processor, self.max_len, self.bad)

    def validation(self, task: str, seed: int) -> Dataset:
        """Loss and perplexity are measured on the validation split (a file, or the
        held-out fraction of the training file with the training seed); without
        one, on the whole training file, as the original's `validate` did."""
        val_file = split_file(self.data, self.root, "val", task)
        if val_file is not None:
            return self.read(val_file)
        train, val = load_splits(self.data, self.root, task, self.encoder, self.processor, self.max_len, self.bad, seed)
        return val or train

    def test_set(self, name: str, file: str, task: str) -> DataFile:
        """data.test_sets.<name>: a file under data.root, read as the test file is."""
        found = dataclasses.replace(data_file(self.data, self.root, task, "test"), path=self.root / file)
        if not found.exists():
            raise ConfigError(f"data.test_sets.{name}: {found.path} does not exist")
        return found


def report(results: dict, predictions: dict[str, list[dict]], bad: BadSamples, out: Path) -> None:
    """The scores printed; results.json and each test set's predictions (predictions[_<set>].jsonl) written."""
    if bad.total:
        print(bad.summary())
    out.mkdir(parents=True, exist_ok=True)
    for name, found in predictions.items():
        with open(
            out / ("predictions.jsonl" if name == "test" else f"predictions_{name}.jsonl"), "w", encoding="utf-8"
        ) as f:
            for p in found:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    blocks = {"test": results} if "accuracy_by" in results else {}
    for name, scores in {**blocks, **results.get("test_sets", {})}.items():
        print(score_table(name, scores))
    print(f"results: {out / 'results.json'}")
    print(f"accuracy={results.get('accuracy', float('nan')):.4f} val_loss={results['val_loss']:.4f}")


def score_table(name: str, scores: dict) -> str:
    """Accuracy per key (all, lang/*, type/*), with the blind and majority figures beside it."""
    columns = [("model", scores["accuracy_by"])]
    columns += [
        (title, scores[k]) for title, k in (("blank picture", "blind_by"), ("majority", "majority_by")) if k in scores
    ]
    lines = [f"{name} ({scores['accuracy_by']['n']} questions)".ljust(28) + "".join(f"{t:>15}" for t, _ in columns)]
    for key in (k for k in scores["accuracy_by"] if k != "n"):
        cells = "".join(f"{c[key]:>15.4f}" if key in c else f"{'-':>15}" for _, c in columns)
        lines.append(f"  {key}".ljust(28) + cells)
    return "\n".join(lines)
