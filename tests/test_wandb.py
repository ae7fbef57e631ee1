"""logger=wandb never needs a login or the network: without credentials it
logs offline into the run folder."""

import json
from pathlib import Path

from svlm.training.loop import train


def test_wandb_logs_offline_without_login(make_train_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb for every other test
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored login
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_train_cfg("logger=wandb", "logger.project=vlm-train", "run_name=s1-vision-heavy", stage="stage1")
    train(cfg)
    stage_dir = Path(cfg.paths.run_dir) / "stage1"
    runs = list((stage_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert json.loads((stage_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] >= 1
