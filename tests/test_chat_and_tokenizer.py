import json

import pytest
from transformers import AutoTokenizer

from svlm.data.chat import (
    END_TOKEN,
    IGNORE,
    IMAGE_TOKEN,
    JINJA_TEMPLATE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    ChatEncoder,
    chat_template,
    place_images,
    render,
)
from svlm.errors import ConfigError
from svlm.tokenizer import load_tokenizer, train_bpe
from svlm.tokenizer.__main__ import main

SINGLE = [("user", "<image>\nWhat colour is the shape?"), ("assistant", "red")]
MULTI = [
    ("user", "<image>\nWhat shape is it?"),
    ("assistant", "a small circle"),
    ("user", "这个形状是什么颜色？"),
    ("assistant", "红色"),
    ("user", "Where is the shape?"),
    ("assistant", "top left"),
]


def supervised(ids, labels):
    return [i for i, lab in zip(ids, labels) if lab != IGNORE]


@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single", "multi"])
def test_label_mask(tokenizer, turns):
    enc = ChatEncoder(tokenizer, num_image_tokens=4)
    ids, labels = enc.encode(turns)
    assert len(ids) == len(labels)
    # a label is the input id itself (the model shifts), or IGNORE
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    sup = supervised(ids, labels)
    answers = [c for r, c in turns if r == "assistant"]
    # exactly the assistant texts, each followed by <|end|>
    assert tokenizer.decode(sup) == "".join(a + END_TOKEN for a in answers)
    assert sup.count(enc.end_id) == len(answers)
    # everything else: role headers, user text, newlines, the image slots, the user's <|end|>
    ignored = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    for role, content in turns:
        if role == "user":
            assert content.replace(IMAGE_TOKEN, "").strip() in ignored
    assert "<|user|>" in ignored and "<|assistant|>" in ignored
    assert ids.count(enc.end_id) == len(turns)
    for i, lab in zip(ids, labels):
        if i in (tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.convert_tokens_to_ids("<|assistant|>")):
            assert lab == IGNORE
        if tokenizer.decode([i]) == "\n":
            assert lab == IGNORE


def test_generation_prompt_is_unsupervised(tokenizer):
    enc = ChatEncoder(tokenizer, 1)
    ids, labels = enc.encode(SINGLE, add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|assistant|>\n")
    plain, _ = enc.encode(SINGLE)
    assert labels[len(plain) :] == [IGNORE] * (len(ids) - len(plain))


@pytest.mark.parametrize("n", [1, 4, 9])
def test_image_expands_to_placeholders(tokenizer, n):
    enc = ChatEncoder(tokenizer, num_image_tokens=n)
    ids, labels = enc.encode(SINGLE)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert enc.image_id == image_id
    assert ids.count(image_id) == n
    start = ids.index(image_id)
    assert ids[start : start + n] == [image_id] * n  # contiguous
    assert all(labels[start + k] == IGNORE for k in range(n))
    base, _ = ChatEncoder(tokenizer, 1).encode(SINGLE)
    assert len(ids) == len(base) + n - 1


def test_prompt_adds_image_tag_once(tokenizer):
    enc = ChatEncoder(tokenizer, 3)
    ids = enc.prompt("What is it?")
    assert ids.count(enc.image_id) == 3
    assert enc.prompt("<image>\nWhat is it?") == ids
    assert enc.prompt("What is it?", image=False).count(enc.image_id) == 0


@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("gen", [True, False])
def test_saved_jinja_template_matches_render(tokenizer, tmp_path, turns, gen):
    tokenizer.save_pretrained(tmp_path / "tok")
    # plain transformers, not svlm's loader: the template must come from the folder
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded.chat_template == JINJA_TEMPLATE
    messages = [{"role": r, "content": c} for r, c in turns]
    text = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert text == render(turns, add_generation_prompt=gen)
    ids, _ = ChatEncoder(loaded, num_image_tokens=1).encode(turns, add_generation_prompt=gen)
    assert loaded.encode(text, add_special_tokens=False) == ids


PLACEMENTS = [  # a user turn as written -> as the model sees it with image_placement=first
    ("<image>\nWhat colour is the shape?", "<image>\nWhat colour is the shape?"),  # the training data's form
    ("What colour is the shape?\n<image>", "<image>\nWhat colour is the shape?"),  # OpenAI's text-first parts
    ("What colour is the shape?<image>", "<image>\nWhat colour is the shape?"),  # the original's jsonl
    ("Compare <image> and <image>, please.", "<image>\n<image>\nCompare\nand\n, please."),
    ("<image>", "<image>"),
    ("<image>\n<image>\nTwo lines\nof text", "<image>\n<image>\nTwo lines\nof text"),
    ("No picture here.", "No picture here."),
]


@pytest.mark.parametrize("written, seen", PLACEMENTS)
def test_images_first_whatever_order_they_come_in(tokenizer, written, seen):
    assert place_images(written, "first") == seen
    assert place_images(written, "inline") == written
    first, inline = ChatEncoder(tokenizer, 3, "first"), ChatEncoder(tokenizer, 3, "inline")
    turns = [("user", written), ("assistant", "red")]
    assert first.encode(turns) == inline.encode([("user", seen), ("assistant", "red")])
    assert first.prompt(written) == inline.prompt(seen)
    assert inline.encode(turns)[0].count(inline.image_id) == 3 * written.count(IMAGE_TOKEN)
    assistant = [("user", "x"), ("assistant", written)]  # only user turns are moved
    assert first.encode(assistant) == inline.encode(assistant)


@pytest.mark.parametrize("placement", ["first", "inline"])
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_template_places_images_like_render(placement, gen):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(chat_template(placement))
    for written, _ in PLACEMENTS:
        turns = [("user", written), ("assistant", "A <image> stays."), ("user", written)]
        messages = [{"role": r, "content": c} for r, c in turns]
        assert template.render(messages=messages, add_generation_prompt=gen) == render(turns, gen, placement)
    # OpenAI/LLaVA-style parts are joined by newlines, an image part as <image>, then placed
    parts = [{"type": "text", "text": "What colour?"}, {"type": "image"}, {"type": "text", "text": "Short answer."}]
    text = template.render(messages=[{"role": "user", "content": parts}], add_generation_prompt=gen)
    assert text == render([("user", "What colour?\n<image>\nShort answer.")], gen, placement)


def test_render_format():
    assert render(SINGLE, add_generation_prompt=True) == (
        "<|user|>\n<image>\nWhat colour is the shape?<|end|>\n<|assistant|>\nred<|end|>\n<|assistant|>\n"
    )


TEXTS = [
    "A small red circle in the top left.",
    "左上方有一个小的红色圆形。",
    "Mixed 中文 and English, with  double  spaces, tabs\tand\nnewlines; émojis 🙂 too!",
    "  leading and trailing spaces  ",
    "What colour ? 这是 什么 ！ a , b . c",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for t in SPECIAL_TOKENS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == t
    assert tokenizer.pad_token == PAD_TOKEN
    assert len(tokenizer) == 400


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.pad_token_id == tokenizer.pad_token_id
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert ChatEncoder(loaded, 4).encode(MULTI) == ChatEncoder(tokenizer, 4).encode(MULTI)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer there"):
        load_tokenizer(tmp_path / "empty")


def test_cli_train(shapes_root, tmp_path, capsys):
    out = tmp_path / "cli-tok"
    files = f"[{shapes_root / 'pretrain_train.jsonl'},{shapes_root / 'sft_train.jsonl'}]"
    code = main([f"files={files}", "vocab_size=300", f"out={out}", f"paths.outputs={tmp_path / 'outputs'}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"out": str(out), "vocab_size": 300}
    tok = load_tokenizer(out)
    assert len(tok) == 300
    assert tok.decode(tok.encode("左上方有一个小的红色圆形。")) == "左上方有一个小的红色圆形。"
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != tok.unk_token_id


def test_train_bpe_learns_merges():
    tok = train_bpe(["banana bandana " * 20, "香蕉香蕉香蕉"], 300)
    # "banana" is frequent enough to be much shorter than its 6 bytes
    assert len(tok.encode("banana", add_special_tokens=False)) < 3
