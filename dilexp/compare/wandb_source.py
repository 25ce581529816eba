"""Runs read from a W&B server (tags, config, summary), for `--wandb ENTITY/PROJECT`."""

from __future__ import annotations

import os
from typing import Any

from dilexp.compare.runs import NOT_IDENTITY, CompareError, Run, _num


def wandb_runs(project: str, group: str | None) -> list[Run]:
    """Runs of an online W&B project (one group): their tags, config and summary."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if not mode:
        from dilexp.telemetry.wandb_logger import wandb_mode  # imports Lightning: only when needed

        mode = wandb_mode("auto")
    if mode != "online":
        raise CompareError(
            f"--wandb reads runs from the W&B server, and W&B is {mode} here "
            f"({'WANDB_MODE=' + os.environ['WANDB_MODE'] if os.environ.get('WANDB_MODE') else 'not logged in'}). "
            "Compare the local run folders instead (python -m dilexp.compare outputs/multirun/...), "
            "or log in (wandb login), upload them (wandb sync <sweep>/*/wandb/offline-run-*) and retry.")
    try:
        import wandb

        api = wandb.Api(timeout=60)
        found = list(api.runs(project, filters={"group": group} if group else None))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown project: one clear line
        raise CompareError(f"W&B: could not list runs of {project!r} ({type(e).__name__}: {e})") from e
    runs, flat_configs = [], []
    states = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "failed"}
    for r in found:
        flat = _flatten(dict(r.config or {}))
        flat_configs.append(flat)
        choices = dict(t.split("=", 1) for t in (r.tags or []) if "=" in t)
        summary = dict(getattr(r, "summary_metrics", None) or {k: r.summary.get(k) for k in r.summary.keys()})
        runs.append(Run(f"wandb:{r.entity}/{r.project}/{r.id} ({r.name})", states.get(r.state, str(r.state)),
                        str(flat.get("task.name", "?")), choices,
                        metrics={k: v for k, v in summary.items() if _num(v) is not None}))
    # Settings that are not config choices (data.seq_len=...) are read off the config itself:
    # the leaves that differ between runs, except under a group whose choice already differs.
    varying_groups = {k for k in {g for r in runs for g in r.settings} if len({r.settings.get(k) for r in runs}) > 1}
    keys = {k for c in flat_configs for k in c}
    for key in sorted(keys):
        if key.split(".")[0] in varying_groups or key.split(".")[0] in ("logger", "group", "experiment_name"):
            continue
        if key in NOT_IDENTITY or len({str(c.get(key)) for c in flat_configs}) < 2:
            continue
        for run, c in zip(runs, flat_configs, strict=True):
            if key in c:
                run.settings[key] = str(c[key])
    return runs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"}:
            out[key] = v["value"]  # the server's raw form wraps each value as {"value": ..., "desc": ...}
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

