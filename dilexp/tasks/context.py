"""What a job knows about itself: run folder, choices, sweep membership, W&B group and tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class JobContext:
    run_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    sweep_dir: Path | None = None
    job_num: int = 0
    job_name: str = "default"

    @classmethod
    def from_hydra(cls) -> JobContext:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        choices = {k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")}
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            run_dir=Path(hc.runtime.output_dir),
            choices=choices,
            overrides=list(hc.overrides.task),
            multirun=multirun,
            sweep_dir=Path(hc.sweep.dir) if multirun else None,
            job_num=int(hc.job.num) if multirun else 0,
            job_name=hc.job.override_dirname or "default",
        )

    def group(self, cfg: DictConfig) -> str | None:
        """W&B group: the config's `group`, else the experiment's name, else the sweep folder."""
        if cfg.get("group"):
            return str(cfg.group)
        if cfg.get("experiment_name"):
            return str(cfg.experiment_name)
        if self.multirun and self.sweep_dir is not None:
            return "sweep-" + "_".join(self.sweep_dir.parts[-2:])
        return None

    def tags(self) -> list[str]:
        return [f"{k}={v}" for k, v in sorted(self.choices.items())][:64]

    def run_name(self) -> str:
        name = self.job_name if self.job_name else "default"
        return (f"{self.job_num}-" if self.multirun else "") + name[:100]


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
