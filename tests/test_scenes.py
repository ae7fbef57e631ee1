"""The scenes data set (svlm/data/scenes/): pictures, captions and questions
that agree with the objects drawn, balanced yes/no questions, held-out
colour-kind pairs, and the files in the format the real loader reads."""

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from svlm.data.drawing import COLOURS, KINDS, object_labels
from svlm.data.formats import read_records
from svlm.data.scenes import TYPES, ScenesSpec, build_scenes
from svlm.data.scenes.questions import ask
from svlm.data.scenes.world import CELLS, HELD_OUT, NUMBERS_ZH, Obj, caption, sample_scene
from svlm.errors import ConfigError

SMALL = dict(n_train=120, n_val=10, n_test=60, n_compositional=30, image_size=36)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_scenes(ScenesSpec(**SMALL), tmp_path_factory.mktemp("scenes"))


def objects_of(rec) -> list[Obj]:
    return [Obj(**o) for o in rec["objects"]]


def test_deterministic_and_cached(tmp_path):
    a = build_scenes(ScenesSpec(**{**SMALL, "n_train": 8}), tmp_path / "a")
    b = build_scenes(ScenesSpec(**{**SMALL, "n_train": 8}), tmp_path / "b")
    for name in ("sft_train.jsonl", "pretrain_val.jsonl", "sft_test.jsonl", "sft_test_compositional.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
    assert (a / "images" / "train-000000.png").read_bytes() == (b / "images" / "train-000000.png").read_bytes()
    assert build_scenes(ScenesSpec(**{**SMALL, "n_train": 8}), tmp_path / "a") == a  # found, not rebuilt
    assert build_scenes(ScenesSpec(**{**SMALL, "n_train": 8, "seed": 1}), tmp_path / "a") != a


def test_files_read_by_the_real_loader(root):
    for name in ("pretrain_train.jsonl", "pretrain_val.jsonl", "sft_train.jsonl", "sft_val.jsonl", "sft_test.jsonl",
                 "sft_test_compositional.jsonl"):  # fmt: skip
        records = list(read_records(root / name))
        assert records and all(len(r.images) == 1 and (root / "images" / r.images[0]).is_file() for r in records)
    with Image.open(root / "images" / "test-000000.png") as im:
        assert im.size == (36, 36) and im.mode == "RGB"
    train = read_jsonl(root / "sft_train.jsonl")
    for rec in train:  # each turn's type is said, every question type among a picture's dozen
        assert len(rec["types"]) == len(rec["conversations"]) // 2
    assert Counter(t for rec in train for t in rec["types"]).keys() >= set(TYPES)


def test_every_type_tested_and_yes_no_balanced(root):
    test = read_jsonl(root / "sft_test.jsonl")
    by_type = Counter(r["type"] for r in test)
    assert set(by_type) == set(TYPES)
    for qtype in ("exists", "relation", "compare"):  # (a quarter of relation questions ask what is nearest)
        answers = Counter(r["conversations"][1]["content"] for r in test if r["type"] == qtype)
        yes = answers["yes"] + answers["有"] + answers["是"]
        no = answers["no"] + answers["没有"] + answers["不是"]
        assert yes + no >= 0.6 * by_type[qtype] and abs(yes - no) <= 0.3 * (yes + no), (qtype, answers)


def test_held_out_pairs_only_in_the_compositional_split(root):
    held = {f"{c} {k}" for c, k in HELD_OUT}
    for name in ("sft_train.jsonl", "sft_val.jsonl", "sft_test.jsonl", "pretrain_train.jsonl"):
        for rec in read_jsonl(root / name):
            assert not {(o["colour"], o["kind"]) for o in rec["objects"]} & set(HELD_OUT)
            text = " ".join(t["content"] for t in rec["conversations"])
            assert not any(pair in text for pair in held), text
    comp = read_jsonl(root / "sft_test_compositional.jsonl")
    assert all({(o["colour"], o["kind"]) for o in r["objects"]} & set(HELD_OUT) for r in comp)
    assert set(Counter(r["type"] for r in comp)) == set(TYPES)


def test_captions_name_every_object(root):
    for rec in read_jsonl(root / "pretrain_train.jsonl")[:40]:
        text = rec["conversations"][1]["content"]
        for o in rec["objects"]:
            if rec["lang"] == "en":
                assert f"a {o['size']} {o['colour']} {o['kind']} in the {CELLS[(o['row'], o['col'])][0]}" in text
            else:
                assert f"{CELLS[(o['row'], o['col'])][1]}有一个" in text and COLOURS[o["colour"]][0] in text
    assert caption([Obj("red", "circle", "small", 0, 0)], "en") == "One object: a small red circle in the top left."


def check_answer(qtype: str, question: str, answer: str, objs: list[Obj]) -> None:
    """Re-derive the answer of an English question from the objects (independently of questions.py)."""
    n = lambda pred: sum(pred(o) for o in objs)  # noqa: E731
    if qtype == "exists":
        colour, kind = question.removeprefix("Is there a ").removesuffix("?").split()
        assert answer == ("yes" if n(lambda o: (o.colour, o.kind) == (colour, kind)) else "no")
    elif question == "How many objects are there?":
        assert answer == str(len(objs))
    elif qtype == "count":
        word = question.removeprefix("How many ").split()[0]
        kinds = {k + ("es" if k == "cross" else "s"): k for k in KINDS}
        if word in kinds:
            assert answer == str(n(lambda o: o.kind == kinds[word]))
        else:
            assert answer == str(n(lambda o: word in (o.colour, o.size)))
    elif qtype == "position":
        assert answer in [name for name, _ in CELLS.values()]
    elif qtype == "object" and question.startswith("What is in the "):
        cell = question.removeprefix("What is in the ").removesuffix("?")
        (o,) = [o for o in objs if CELLS[(o.row, o.col)][0] == cell]
        assert answer == f"{o.colour} {o.kind}"


def test_answers_agree_with_the_objects():
    rng = random.Random(3)
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    seen = Counter()
    for _ in range(300):
        objs = sample_scene(6, rng)
        assert len({(o.row, o.col) for o in objs}) == len(objs)  # one object a cell
        for qtype in TYPES:
            qa = ask(qtype, objs, objs, pairs, "en", rng)
            if qa is not None:
                check_answer(qtype, *qa, objs)
                seen[qtype] += 1
    assert set(seen) == set(TYPES)
    # Chinese numbers, and a question never names its object by the attribute it asks about
    qa = ask("count", [Obj("red", "circle", "small", 0, 0)] * 2, [Obj("red", "circle", "small", 0, 0)], pairs, "zh",
             random.Random(0))  # fmt: skip
    assert qa[1] in NUMBERS_ZH
    one = [Obj("red", "circle", "small", 0, 0), Obj("blue", "square", "large", 1, 1)]
    for _ in range(20):
        q, a = ask("colour", one, one, pairs, "en", rng)
        assert "red" not in q and "blue" not in q and a in ("red", "blue")


def test_object_labels_put_each_object_in_its_cell():
    objs = [{"colour": "red", "kind": "circle", "size": "small", "x": 0.1, "y": 0.1},
            {"colour": "blue", "kind": "cross", "size": "large", "x": 0.9, "y": 0.5}]  # fmt: skip
    labels = object_labels(objs, 3)
    assert labels[0] == [1, 1, 1] and labels[5] == [5, 4, 2]
    assert all(row == [0, 0, 0] for i, row in enumerate(labels) if i not in (0, 5))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"max_objects": 7}, "data.max_objects"),
        ({"image_size": 24}, "data.image_size"),
        ({"questions": 0}, "data.questions"),
        ({"languages": ("fr",)}, "data.languages"),
    ],  # fmt: skip
)
def test_bad_settings_name_their_key(change, key):
    with pytest.raises(ConfigError, match=key):
        ScenesSpec(**{**SMALL, **change})


# ------------------------------------------------------- training and scoring on scenes

SCENES_OVERRIDES = [
    "data=scenes", "data.n_train=48", "data.n_val=12", "data.n_test=6", "data.n_compositional=4",
    "data.image_size=36", "data.questions=4",
    "model.vision.image_size=36", "model.vision.patch_size=4", "model.projector.factor=3",  # 3 x 3 visual tokens
    "stage.stage2.eval_every=2", "stage.stage2.object_loss=0", "stage.stage2.skills=3",
]  # fmt: skip


def test_the_scenes_recipe_comes_with_the_tiny_model_and_yields_to_the_command_line():
    from conftest import compose

    cfg = compose("train", ["data=scenes"])
    assert (cfg.model.vision.image_size, cfg.model.vision.patch_size, cfg.model.projector.factor) == (72, 6, 4)
    assert cfg.model.object_head and cfg.model.projector.pos_embed and cfg.tokenizer.vocab_size == 1024
    assert (cfg.stage.stage1.object_loss, cfg.stage.stage1.max_steps, cfg.stage.stage2.max_steps) == (1.0, 250, 500)
    assert compose("train", ["data=scenes", "stage=stage2"]).stage.max_steps == 500
    assert compose("train", ["data=scenes", "stage=stage1"]).stage.object_loss == 1.0
    mine = compose("train", ["data=scenes", "model.vision.patch_size=8", "stage.stage2.max_steps=7"])
    assert (mine.model.vision.patch_size, mine.stage.stage2.max_steps) == (8, 7)
    other = compose("train", ["data=scenes", "model=base"])  # a pretrained encoder keeps its own size
    assert not other.model.get("object_head") and other.model.vision.patch_size == 14
    assert not compose("train", []).model.object_head  # shapes: no recipe


@pytest.fixture(scope="module")
def scenes_run(tmp_path_factory, cache_dir):
    """One stage=both run of a tiny model on tiny scenes, with the object head and skill curves."""
    from conftest import MODEL_OVERRIDES, compose, path_overrides, tiny_train_overrides

    from svlm.config import load_train_config
    from svlm.training.loop import train

    base = tmp_path_factory.mktemp("scenes-run")
    model = [o for o in MODEL_OVERRIDES if not o.startswith(("model.vision.image_size", "model.vision.patch_size",
                                                             "model.projector.factor"))]  # fmt: skip
    train_part = [o for o in tiny_train_overrides("both", steps=4) if not o.startswith(("data.", "model."))]
    cfg = load_train_config(
        compose("train", [*train_part, *model, *SCENES_OVERRIDES, *path_overrides(base, cache_dir)])
    )
    return cfg, train(cfg)


def test_skill_curves_written_with_one_curve_a_type_and_the_blind_line(scenes_run):
    from svlm.evaluation.skills import skill_curves

    cfg, _ = scenes_run
    run = Path(cfg.paths.run_dir)
    assert (run / "skills.png").stat().st_size > 10_000
    curves = skill_curves(run)
    assert set(curves) == set(TYPES)  # every type of the validation questions
    for c in curves.values():
        assert len(c["minutes"]) == len(c["model"]) == len(c["blind"]) == 2  # validations at steps 2 and 4
        assert all(0 <= v <= 1 for v in c["model"] + c["blind"])
        assert c["minutes"][0] < c["minutes"][1]
    stage1_minutes = max(json.loads(line).get("time", 0) for line in (run / "stage1" / "metrics.jsonl").open()) / 60
    assert min(c["minutes"][0] for c in curves.values()) > stage1_minutes  # stage 2 after stage 1, end to end


def test_object_head_trained_where_its_loss_is_on(scenes_run):
    cfg, (stage1, stage2) = scenes_run
    aux = [
        json.loads(line).get("train/aux_loss") for line in (Path(cfg.paths.run_dir) / "stage1" / "metrics.jsonl").open()
    ]
    assert any(a and a > 0 for a in aux)  # the object loss counted in stage 1 (the recipe's 1.0)
    aux2 = [
        json.loads(line).get("train/aux_loss") for line in (Path(cfg.paths.run_dir) / "stage2" / "metrics.jsonl").open()
    ]
    assert all(not a for a in aux2 if a is not None)  # SCENES_OVERRIDES turn it off in stage 2
    from svlm.model_folder import load_model

    model, _, _ = load_model(stage2)
    assert model.object_head is not None and model.cfg.object_classes == [7, 5, 3]


def test_eval_reports_blind_majority_and_the_compositional_split(scenes_run, tmp_path, cache_dir, capsys):
    """`python eval.py data.n_test=3`: the model's own data with that one key changed; every test set
    scored with the picture, with a blank one and by the majority answer."""
    from test_commands import command_main

    from svlm.data.embedded import build_embedded

    cfg, (_, stage2) = scenes_run
    args = [f"ckpt={stage2}", "hardware=cpu", "max_new_tokens=4", "data.n_test=3", f"paths.cache={cache_dir}",
            f"paths.outputs={tmp_path}"]  # fmt: skip
    assert command_main("eval")(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    (run,) = (tmp_path / "eval").iterdir()
    results = json.loads((run / "results.json").read_text())
    data = {**dataclasses.asdict(cfg.data), "n_test": 3}
    assert results["accuracy_by"]["n"] == len(
        read_jsonl(build_embedded("scenes", data, cache_dir / "data") / "sft_test.jsonl")
    )
    for block in (results, results["test_sets"]["compositional"]):
        assert {"accuracy_by", "blind_by", "majority_by"} <= set(block)
        assert block["blind_by"]["n"] == block["majority_by"]["n"] == block["accuracy_by"]["n"] > 0
    predictions = read_jsonl(run / "predictions.jsonl")
    assert all("blind_answer" in p and p["majority_correct"] in (True, False) for p in predictions)
    assert (run / "predictions_compositional.jsonl").is_file()
    assert "blank picture" in out and "majority" in out and "compositional" in out


def test_eval_data_override_of_an_unknown_key_is_one_line(scenes_run, tmp_path, capsys):
    from test_commands import command_main

    _, (_, stage2) = scenes_run
    assert command_main("eval")([f"ckpt={stage2}", "data.max_object=3", f"paths.outputs={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.max_object" in err and err.count("\n") == 1, err
