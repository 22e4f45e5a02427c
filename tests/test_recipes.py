"""Every shipped recipe is a valid TrainConfig; accelerate configs are valid YAML."""

from pathlib import Path

import pytest
import yaml

from ar2dlm.train.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_parses(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.data.train, "a recipe names its data"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_tidar_recipes_use_published_settings():
    for name in ("qwen2.5-1.5b-tidar.yaml", "qwen3-8b-tidar-fsdp.yaml"):
        cfg = TrainConfig.from_yaml(RECIPES / name)
        assert cfg.objective.block_size == 16 and cfg.objective.loss_weight == 1.0
        assert cfg.optim.lr == 1e-5 and abs(cfg.optim.lr * cfg.schedule.min_lr_ratio - 3e-6) < 1e-12
        assert cfg.schedule.warmup_fraction == 0.01 and cfg.data.seq_len == 4096


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_is_yaml(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
