"""Every option of every config group composes, and the default is what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from dilexp.main import CONF_DIR

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


def test_the_groups_of_the_design_exist() -> None:
    for group in ("task", "attention", "cache", "memory", "hardware", "model", "data", "logger", "debug",
                  "experiment"):
        assert group in GROUPS


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}"])
    # Resolve everything (oc.env defaults included) so a broken interpolation fails here.
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["task"]["name"] in ("train", "bench", "eval", "check")
    if group == "attention":
        assert cfg.attention.name == option
    if group == "cache":
        assert cfg.cache.strategy == option
    if group == "memory":
        assert cfg.memory.kind == option


def test_default_is_a_tiny_dilated_run_with_both_loggers(compose_cfg) -> None:
    cfg = compose_cfg()
    assert cfg.attention.name == "dilated"
    assert cfg.cache.strategy == "local"
    assert cfg.task.name == "train"
    assert cfg.data.name == "recall"
    assert set(cfg.logger) == {"csv", "wandb"}


def test_loggers_can_be_combined_or_dropped(compose_cfg) -> None:
    assert set(compose_cfg(["logger=csv"]).logger) == {"csv"}
    assert set(compose_cfg(["logger=[csv,wandb]"]).logger) == {"csv", "wandb"}
    assert len(compose_cfg(["logger=none"]).logger) == 0


def test_experiment_overrides_groups(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=long_recall"])
    assert cfg.experiment_name == "long_recall"
    assert cfg.data.seq_len == 2048
