import pytest
import torch
import yaml
from conftest import CONF, REPO, compose, path_overrides, tiny_train_overrides
from hydra.errors import ConfigCompositionException

from svlm.config import (
    BothStagesConfig,
    ConfigError,
    StageConfig,
    TrainConfig,
    load_eval_config,
    load_infer_config,
    load_train_config,
)
from svlm.data.chat import ChatEncoder
from svlm.training.prepare import build_model

GROUPS = ["model", "data", "stage", "hardware", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert {"model", "data", "stage", "hardware", "logger"} <= found
    assert ("stage", "both") in OPTIONS and ("model", "tiny") in OPTIONS


@pytest.fixture
def paths(tmp_path, cache_dir):
    return path_overrides(tmp_path, cache_dir)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_loads(group, option, paths):
    cfg = load_train_config(compose("train", [f"{group}={option}", *paths]))
    assert isinstance(cfg, TrainConfig)
    if group != "experiment":
        assert getattr(cfg, group).name == option  # each file names itself
    for stage in cfg.stages():
        assert isinstance(stage, StageConfig)


def test_stage_options_give_their_stages(paths):
    def names(option):
        return [(s.name, s.task) for s in load_train_config(compose("train", [f"stage={option}", *paths])).stages()]

    assert names("stage1") == [("stage1", "pretrain")]
    assert names("stage2") == [("stage2", "sft")]
    assert names("both") == [("stage1", "pretrain"), ("stage2", "sft")]


def test_both_stages_shared_and_own_settings(paths):
    cfg = load_train_config(
        compose(
            "train", ["stage=both", "stage.max_steps=7", "stage.stage2.lr=0.5", "stage.stage1.batch_size=4", *paths]
        )
    )
    assert isinstance(cfg.stage, BothStagesConfig)
    s1, s2 = cfg.stages()
    assert (s1.max_steps, s2.max_steps) == (7, 7)
    assert (s1.batch_size, s2.batch_size) == (4, 32)
    assert s2.lr == 0.5 and s1.lr == 1e-3
    cfg = load_train_config(compose("train", ["stage=both", "stage.lr=0.25", *paths]))
    assert [s.lr for s in cfg.stages()] == [0.25, 0.25]


def _shrink(paths: list[str], option: str) -> list[str]:
    """Overrides that make a model option small enough for a CPU test (none for a small one)."""
    cfg = load_train_config(compose("train", [f"model={option}", *paths]))
    lm, vision = cfg.model.lm, cfg.model.vision
    extra = []
    if vision.path is not None:  # a real DINOv2 folder: test the architecture with random weights
        extra.append("++model.vision.path=null")
    if lm.path is not None:  # a real language-model folder: the same, at the default shape
        extra.append("model.lm.path=null")
    if lm.d_model * lm.n_layers > 256 * 8:
        extra += [f"model.lm.d_model={lm.n_heads * 16}", "model.lm.n_layers=2", "++model.lm.d_ff=null"]
    if vision.hidden_size * vision.num_layers > 384 * 4 or vision.image_size > 224:
        extra += [f"model.vision.hidden_size={vision.num_heads * 16}", "model.vision.num_layers=1"]
    return extra


def _forward(model, tokenizer, batch_size=2):
    enc = ChatEncoder(tokenizer, model.num_image_tokens)
    samples = [
        enc.encode([("user", "<image>\nWhat colour is the shape?"), ("assistant", "red")]),
        enc.encode([("user", "<image>\nDescribe the picture."), ("assistant", "A small red circle.")]),
    ][:batch_size]
    T = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), T), enc.pad_id)
    labels = torch.full((len(samples), T), -100)
    for b, (i, lab) in enumerate(samples):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
    S = model.cfg.vision.image_size
    out = model(ids, torch.randn(len(samples), 3, S, S), labels)
    n_targets = sum(sum(x != -100 for x in lab[1:]) for _, lab in samples)
    assert out.logits.shape == (n_targets, len(tokenizer))  # logits only where the loss needs them
    assert torch.isfinite(out.loss) and out.n_tokens == n_targets
    return out


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_option_builds_and_runs(option, paths, tokenizer):
    overrides = [f"model={option}", *paths]
    cfg = load_train_config(compose("train", [*overrides, *_shrink(paths, option)]))
    model = build_model(cfg, tokenizer)
    assert model.cfg.lm.vocab_size == len(tokenizer)
    assert model.cfg.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    out = _forward(model, tokenizer)
    out.loss.backward()
    for part in (model.vision, model.projector, model.lm):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


VARIANTS = {
    "resampler": ["model.projector.kind=resampler", "+model.projector.queries=5", "+model.projector.heads=4"],
    "avg_pool": ["model.projector.compress=avg_pool"],
    "no_compress_cls": ["model.projector.compress=none", "model.vision.use_cls=true"],
    "moe_learned_layernorm": ["model.lm.mlp=moe", "model.lm.pos=learned", "model.lm.norm=layernorm"],
    "gqa_gelu": ["model.lm.n_kv_heads=2", "model.lm.mlp=gelu", "model.lm.tie_embeddings=false"],
    "reducer": ["+model.lm.d_in=96", "+model.lm.rank=16"],
}
TOKENS = {"resampler": 5, "avg_pool": 4, "no_compress_cls": 17, "reducer": 4}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_variants_build_and_run(variant, paths, tokenizer):
    cfg = load_train_config(compose("train", [*tiny_train_overrides(), *paths, *VARIANTS[variant]]))
    model = build_model(cfg, tokenizer)
    assert model.num_image_tokens == TOKENS.get(variant, 4)
    _forward(model, tokenizer).loss.backward()


def test_unknown_key_fails(paths):
    with pytest.raises(ConfigCompositionException, match="stage.lrr"):
        compose("train", ["stage.lrr=1", *paths])
    # a key added with + reaches the typed config, which knows no such key
    with pytest.raises(ConfigError, match="stage.lrr"):
        load_train_config(compose("train", ["stage=stage1", "+stage.lrr=1", *paths]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stage=both", "stage.stage1.lr=abc"], "stage.stage1.lr"),
        (["stage=stage1", "stage.lr=abc"], "stage.lr"),
        (["data.max_shapes=many"], "data.max_shapes"),
        (["hardware.device=tpu"], "hardware.device"),
        (["stage=stage2", "stage.batch_size=0"], "stage.batch_size"),
        (["stage=stage1", "stage.warmup=1.5"], "stage.warmup"),
        (["model.lm.d_model=65"], "model.lm.d_model"),
        (["model.vision.image_size=62"], "model.vision.image_size"),
        (["stage=stage1", "stage.train_vision=yes please"], "stage.train_vision"),
    ],
)
def test_wrong_value_names_the_key(overrides, key, paths):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(compose("train", [*overrides, *paths]))


def test_stage_that_trains_nothing(paths):
    off = ["train_vision=false", "train_projector=false", "unfreeze_lm_top_layers=0", "train_text_embed=false"]
    with pytest.raises(ConfigError, match="trains nothing"):
        load_train_config(compose("train", ["stage=stage1", *(f"stage.{o}" for o in off), *paths]))


def test_tiny_train_config(tiny_cfg, tmp_path, cache_dir):
    assert tiny_cfg.paths.run_dir == str(tmp_path / "run")
    assert tiny_cfg.paths.cache == str(cache_dir)
    assert (tiny_cfg.model.lm.d_model, tiny_cfg.model.lm.n_layers) == (64, 2)
    assert tiny_cfg.data.n_train == 64 and tiny_cfg.data.image_size == tiny_cfg.model.vision.image_size == 32
    assert [(s.max_steps, s.batch_size) for s in tiny_cfg.stages()] == [(3, 8), (3, 8)]


def test_cache_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SVLM_CACHE", str(tmp_path / "envcache"))
    cfg = load_train_config(compose("train", [f"paths.run_dir={tmp_path}"]))
    assert cfg.paths.cache == str(tmp_path / "envcache")


def test_eval_config(paths):
    cfg = load_eval_config(compose("eval", [*paths, "ckpt=some/model", "max_test=5"]))
    assert cfg.ckpt == "some/model" and cfg.max_test == 5
    cfg = load_eval_config(compose("eval", [*paths, "data=shapes", "data.n_test=7"]))
    assert cfg.data.name == "shapes" and cfg.data.n_test == 7
    with pytest.raises(ConfigError, match="batch_size"):
        load_eval_config(compose("eval", [*paths, "batch_size=big"]))


def test_infer_config(paths):
    cfg = load_infer_config(compose("infer", [*paths, "image=x.png", "prompt=Hi", "temperature=0.7"]))
    assert (cfg.image, cfg.prompt, cfg.temperature, cfg.ckpt) == ("x.png", "Hi", 0.7, None)
    for bad, key in [("temperature=-1", "temperature"), ("top_p=0", "top_p"), ("max_new_tokens=0", "max_new_tokens")]:
        with pytest.raises(ConfigError, match=key):
            load_infer_config(compose("infer", [*paths, bad]))


def test_environment_yml_matches_pyproject():
    env_file = REPO / "environment.yml"
    if not env_file.is_file():
        pytest.skip("environment.yml not written yet")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load(env_file.read_text())
    assert env["name"] == "svlm"
    deps = env["dependencies"]
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs one pip: list"
    assert "pip" in deps and any(str(d).startswith("python") for d in deps)
    pip = [str(r).strip() for r in pip_lists[0]]
    assert any(r.startswith("-e .") for r in pip), "environment.yml should install the package itself (-e .[dev])"
    assert {r for r in pip if not r.startswith("-e")} == set(project["dependencies"])
