"""A pretrained LM's own chat template (svlm/data/lm_template.py): what is fed,
what is supervised, where generation stops, and what the export carries.
Tokenizers with ChatML (Qwen) and Llama-3-style templates are trained here."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from svlm.data.chat import IGNORE, ChatEncoder, chat_format_of
from svlm.data.dataset import encode_record
from svlm.data.formats import DataError, Record
from svlm.errors import ConfigError
from svlm.tokenizer import load_tokenizer

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif -%}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
LLAMA3 = (
    "{{ bos_token }}{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor -%}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif -%}"
)
# Qwen3's way: an empty <think></think> before the answers after the last question,
# and in the generation prompt when thinking is off.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif -%}"
)
STYLES = {
    "qwen3": (QWEN3_LIKE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}, "<|im_end|>"),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        "<|eot_id|>",
    ),
}
TEXTS = ["What colour is the shape?", "It is a red circle.", "And how many are there?", "Three.", "Where is it?"] * 20
TURNS = [
    ("user", "What colour is the shape?\n<image>"),
    ("assistant", "It is a red circle."),
    ("user", "And how many are there?"),
    ("assistant", "Three."),
    ("user", "Where is it?"),
    ("assistant", "At the top left, near the edge."),
]


def lm_tokenizer(folder, style: str, template: str | None = None) -> str:
    """A byte-level BPE with the style's special tokens and chat template, saved to `folder`."""
    default, specials, roles, _ = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template or default, **roles)
    fast.save_pretrained(folder)
    return str(folder)


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The supervised ids, one list per contiguous run."""
    out, last = [], False
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i  # a supervised position predicts its own token
            if not last:
                out.append([])
            out[-1].append(i)
        last = lab != IGNORE
    return out


@pytest.mark.parametrize("style", STYLES)
def test_supervised_tokens_are_the_answers_and_their_end_of_turn(style, tmp_path):
    tok = load_tokenizer(lm_tokenizer(tmp_path, style), "auto")
    assert chat_format_of(tok) == "tokenizer" and tok.chat_template == STYLES[style][0]  # its own, kept
    enc = ChatEncoder(tok, num_image_tokens=3, chat_format="tokenizer")
    end = STYLES[style][3]
    assert enc.end_id == tok.convert_tokens_to_ids(end) and enc.stop_ids == [enc.end_id]
    ids, labels = enc.encode(TURNS)
    answers = [text for role, text in TURNS if role == "assistant"]
    assert [tok.decode(run) for run in runs(ids, labels)] == [a + end for a in answers]
    # Fed: exactly what the template renders (the <image> as 3 slots), tokenized as one string.
    placed = [("user", "<image>\nWhat colour is the shape?"), *TURNS[1:]]
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in placed], tokenize=False)
    collapsed = [t for k, t in enumerate(ids) if not (t == enc.image_id and ids[k - 1] == enc.image_id)]
    assert ids.count(enc.image_id) == 3 and collapsed == tok(rendered, add_special_tokens=False).input_ids
    # A prompt ends with the template's generation prompt, and holds the history unsupervised.
    prompt = enc.prompt("Where is it?", history=TURNS[:4])
    gen = tok.apply_chat_template([{"role": "user", "content": "QQ"}], tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)  # fmt: skip
    assert tok.decode(prompt).endswith(gen.split("QQ", 1)[1]) and prompt == enc.encode(TURNS[:5], True)[0]
    # What a prompt holds is what training fed before that answer.
    ids, labels = enc.encode(TURNS[:6])
    assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE != labels[len(prompt)]


def test_ours_when_asked_or_when_the_folder_has_no_template(tmp_path):
    folder = lm_tokenizer(tmp_path / "chatml", "chatml")
    tok = load_tokenizer(folder, "ours")
    assert chat_format_of(tok) == "ours" and "<|end|>" in tok.get_vocab()
    bare = PreTrainedTokenizerFast.from_pretrained(folder)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    assert chat_format_of(load_tokenizer(tmp_path / "bare", "auto")) == "ours"


def test_a_template_with_no_end_of_turn_token_is_refused(tmp_path):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(lm_tokenizer(tmp_path, "chatml", template=plain), "auto")
    with pytest.raises(ConfigError, match=f"{tmp_path}.*no special token right after an answer.*chat_template=ours"):
        ChatEncoder(tok, 1, chat_format="tokenizer")


def test_a_template_that_drops_earlier_answers_names_the_record(tmp_path):
    last_only = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] if m['role'] == 'user' or loop.last else '' }}<|im_end|>\n{% endfor %}"
    )
    tok = load_tokenizer(lm_tokenizer(tmp_path, "chatml", template=last_only), "auto")
    enc = ChatEncoder(tok, 1, chat_format="tokenizer")
    with pytest.raises(DataError, match=r"data.jsonl:7: chat template: .*does not write the answer of turn 2"):
        encode_record(Record([("user", "What colour?"), *TURNS[1:]], [], "data.jsonl:7"), enc, tmp_path, 512)


def test_generation_stops_at_the_first_of_its_stop_ids(make_train_cfg, tokenizer):
    from svlm.inference.generation import generate
    from svlm.training.prepare import build_model

    model = build_model(make_train_cfg(), tokenizer).eval()
    ids = torch.randint(10, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    free = generate(model, ids, None, stop_ids=-1, max_new_tokens=8)[0]
    assert (
        generate(model, ids, None, stop_ids=[-1, free[3], free[5]], max_new_tokens=8)[0] == free[: free.index(free[3])]
    )


def test_the_export_formats_as_we_do(tmp_path, make_train_cfg):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2Config, Qwen2ForCausalLM

    from svlm.export import export_model, import_model
    from svlm.model_folder import load_model
    from svlm.training.prepare import build_model

    folder = tmp_path / "qwen2"
    lm_tokenizer(folder, "chatml")  # 300 tokens
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok = load_tokenizer(folder, "auto")  # read as Qwen2's tokenizer now, with <|endoftext|> as its pad token
    end, text_end = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, text_end]}))
    cfg = make_train_cfg(f"model.lm.path={folder}", "model.projector.kind=mlp", "model.projector.factor=1")
    model = build_model(cfg, load_tokenizer(cfg.tokenizer.path, "auto")).eval()
    assert model.cfg.chat_format == "tokenizer" and model.cfg.stop_ids == [end, text_end]
    assert ChatEncoder.for_model(tok, model).stop_ids == [end, text_end]
    out = export_model(model, tok, tmp_path / "export")
    proc = AutoProcessor.from_pretrained(out)
    question = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}, {"type": "image"}]}]
    text = proc.apply_chat_template(question, add_generation_prompt=True)
    image = torch.rand(3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    inputs = proc(images=[image], text=text, return_tensors="pt", do_rescale=False)
    ours = ChatEncoder.for_model(tok, model).prompt("What colour?")  # image first, as the model was trained
    assert inputs["input_ids"][0].tolist() == ours
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.generation_config.eos_token_id == [end, text_end]
    with torch.no_grad():
        theirs = exported(**inputs).logits
        mine = model(torch.tensor([ours]), inputs["pixel_values"]).logits
    assert (theirs - mine).norm() / mine.norm() <= 1e-5
    back, tok_back, _ = load_model(import_model(out, tmp_path / "back"))
    assert back.cfg.chat_format == "tokenizer" and tok_back.chat_template == CHATML
    assert ChatEncoder.for_model(tok_back, back).prompt("What colour?") == ours
