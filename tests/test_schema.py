"""The typed config schema (dilexp/config, issue 14 items 4-6): every field of every group checked
before any work, one line naming the field, exit 2, no run folder left behind."""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from dilexp.cache import settings as CS
from dilexp.config import check_config
from dilexp.config import schema as S
from dilexp.errors import ConfigError
from dilexp.main import CONF_DIR

# The overrides that select each schema (SCHEMAS' options, plus the groups with one schema).
SELECT: list[tuple[str, list[str], type]] = []
for _group, (_selector, _options) in S.SCHEMAS.items():
    for _name, _cls in _options.items():
        SELECT.append((f"{_group}.{_selector}={_name}", [f"{_group}={_name}"], _cls))
SELECT += [("model", [], S.Model), ("hardware", [], S.Hardware), ("logger", ["logger=[csv,wandb]"], S.Loggers),
           ("bench", ["task=bench"], S.Bench), ("root", [], S.Root)]
PREFIX = {S.Model: "model", S.Hardware: "hardware", S.Loggers: "logger", S.Bench: "bench", S.Root: ""}


def _prefix(cls: type) -> str:
    if cls in PREFIX:
        return PREFIX[cls]
    return next(g for g, (_, opts) in S.SCHEMAS.items() if cls in opts.values())


def _leaves(cls: type, prefix: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(dotted field, annotation, metadata) of every leaf field, nested dataclasses expanded."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], f"{prefix}.{f.name}" if prefix else f.name
        if tp is S.Option:
            continue  # a group: its own schema's cases
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, name)
        else:
            out.append((name, tp, dict(f.metadata)))
    return out


def _arms(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _bad_values(tp: Any, meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """Values that fit no arm of the annotation: a wrong type, and for integers a non-integer."""
    arms = _arms(tp)
    out: list[tuple[str, Any]] = []
    if str not in arms and tp is not Any:
        out.append(("word", "abc"))
    else:
        out.append(("mapping", {"a": 1}))
    if int in arms or any(typing.get_args(a) == (int,) for a in arms):
        out.append(("non-integer", 2.5 if int in arms else [64.5, 128]))
    if arms == (list[float],):
        out.append(("list-of-words", ["abc"]))
    if bool in arms:
        out.append(("number-for-bool", 3))
    if "choices" in meta and (str in arms or tp is Any):
        out.append(("not-a-choice", "bogus-choice"))
    return out


CASES = []
for _label, _select, _cls in SELECT:
    for _field, _tp, _meta in _leaves(_cls, _prefix(_cls)):
        for _kind, _value in _bad_values(_tp, _meta):
            CASES.append(pytest.param(_select, _field, _value, id=f"{_field}:{_kind}:{_label}"))


@pytest.fixture(scope="module")
def composed() -> typing.Iterator[Any]:
    """Compose each selection once (Hydra's compose API); the cases change copies of it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cache: dict[tuple[str, ...], DictConfig] = {}

    def get(overrides: list[str]) -> DictConfig:
        key = tuple(overrides)
        if key not in cache:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cache[key] = compose(config_name="config", overrides=overrides)
        return copy.deepcopy(cache[key])

    yield get
    GlobalHydra.instance().clear()


def test_every_group_of_conf_has_a_schema() -> None:
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    # Groups that only select other options or set Hydra's own nodes have no node of their own.
    assert groups - {"experiment", "debug", "hparams_search", "launcher"} == {
        "task", "model", "data", "cache", "attention", "memory", "hardware", "logger"}
    for group, (_, options) in S.SCHEMAS.items():
        on_disk = {f.stem for f in (Path(CONF_DIR) / group).glob("*.yaml")}
        assert set(options) == on_disk, group


@pytest.mark.parametrize(("select", "field", "value"), CASES)
def test_a_wrong_value_names_its_field(composed, select: list[str], field: str, value: Any) -> None:
    cfg = composed(select)
    check_config(copy.deepcopy(cfg))  # the shipped option itself is valid
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, field, value, force_add=True, merge=False)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert err.value.field == field, str(err.value)


UNKNOWN = [pytest.param(select, f"{_prefix(cls) + '.' if _prefix(cls) else ''}tpyo_key", id=label)
           for label, select, cls in SELECT if cls is not S.Bench or True]
UNKNOWN += [pytest.param([], "task.max_step", id="task.max_step (item 5)"),
            pytest.param(["task=eval"], "task.passkey.sample", id="task.passkey nested"),
            pytest.param(["logger=[csv,wandb]"], "logger.wandb.projet", id="logger.wandb nested")]


@pytest.mark.parametrize(("select", "field"), UNKNOWN)
def test_an_unknown_key_is_an_error(compose_cfg, select: list[str], field: str) -> None:
    cfg = compose_cfg([*select, f"++{field}=10"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert err.value.field == field
    assert "unknown key" in str(err.value)


# Issue 14's reproductions (items 4-6), through Hydra's override parser.
REPRO = [
    (["task.max_steps=abc"], "task.max_steps"),
    (["task.batch_size=abc"], "task.batch_size"),
    (["task.lr=abc"], "task.lr"),
    (["task.warmup_steps=abc"], "task.warmup_steps"),
    (["data.seq_len=abc"], "data.seq_len"),
    (["model.n_layer=abc"], "model.n_layer"),
    (["seed=abc"], "seed"),
    (["hardware=cp", "hardware.timeout_s=abc"], "hardware.timeout_s"),
    (["task.val_every_n_steps=0"], "task.val_every_n_steps"),
    (["hardware.devices=0"], "hardware.devices"),
    (["hardware.threads=-1"], "hardware.threads"),
    (["hardware.precision=bogus"], "hardware.precision"),
    (["hardware=cp", "hardware.timeout_s=0"], "hardware.timeout_s"),
    (["task.max_steps=0"], "task.max_steps"),
    (["task.grad_clip=-1"], "task.grad_clip"),
    (["+task.max_step=10"], "task.max_step"),
    (["+model.n_layers=3"], "model.n_layers"),
    (["+data.seqlen=3"], "data.seqlen"),
    (["+hardware.device=3"], "hardware.device"),
    (["+sed=3"], "sed"),
    (["attention.segment_lengths=[64.5,128,256]"], "attention.segment_lengths"),
    (["data.seq_len=256.5"], "data.seq_len"),
    (["task.max_steps=true"], "task.max_steps"),
]


@pytest.mark.parametrize(("overrides", "field"), REPRO, ids=[",".join(o) for o, _ in REPRO])
def test_issue_reproductions_fail_at_the_check(compose_cfg, overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(overrides))
    assert err.value.field == field


@pytest.mark.parametrize("overrides", [[], ["hardware.precision=32"], ["hardware.precision=bf16-mixed"],
                                       ["hardware.devices=auto"], ["task.max_steps=1e3"], ["task.max_steps='12'"],
                                       ["task.grad_clip=null"], ["++task.checkpoint_every_n_steps=50"],
                                       ["++task.checkpoint_every_s=30.5"], ["++task.resume=auto"],
                                       ["++hardware.timeout_s=600"], ["+resume=true"]])
def test_good_values_pass_and_are_converted(compose_cfg, overrides: list[str]) -> None:
    cfg = check_config(compose_cfg(overrides))
    assert isinstance(cfg.task.max_steps, int) and not isinstance(cfg.task.max_steps, bool)


def test_env_values_are_typed_in_the_recorded_config(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in CS.ENV_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    cfg = check_config(compose_cfg(["cache=gpu"]))
    rec = OmegaConf.to_container(cfg, resolve=True)["cache"]
    assert rec == {"strategy": "gpu", "hot_max_bytes": CS.DEFAULT_HOT_MAX_BYTES, "max_entries": CS.DEFAULT_MAX_ENTRIES,
                   "max_bytes": CS.DEFAULT_MAX_BYTES, "promote_after": CS.DEFAULT_PROMOTE_AFTER,
                   "pregenerate": CS.DEFAULT_PREGENERATE}
    assert type(rec["max_entries"]) is int and type(rec["pregenerate"]) is bool
    monkeypatch.setenv(CS.ENV_MAX_ENTRIES, "64")
    monkeypatch.setenv(CS.ENV_MAX_BYTES, "2MiB")
    monkeypatch.setenv(CS.ENV_PREGENERATE, "off")
    rec = OmegaConf.to_container(check_config(compose_cfg(["cache=gpu"])), resolve=True)["cache"]
    assert (rec["max_entries"], rec["max_bytes"], rec["pregenerate"]) == (64, 2 << 20, False)


@pytest.mark.parametrize(("var", "value"), [(CS.ENV_MAX_ENTRIES, "abc"), (CS.ENV_MAX_ENTRIES, "2.5"),
                                            (CS.ENV_MAX_BYTES, "lots"), (CS.ENV_PREGENERATE, "maybe")])
def test_a_bad_environment_value_names_the_variable(compose_cfg, monkeypatch: pytest.MonkeyPatch, var: str,
                                                    value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(["cache=gpu"]))
    assert err.value.field == var


def test_an_oc_env_value_of_the_wrong_type_names_the_variable(compose_cfg,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILEXP_MEMORY_MAX_BYTES", "lots")
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(["memory=bucketed"]))
    assert err.value.field == "DILEXP_MEMORY_MAX_BYTES" and "memory.max_bytes" in str(err.value)


def test_cache_defaults_live_in_one_place() -> None:
    # The yaml names the variable; the default is settings.py's (no second copy in conf/cache/).
    for name in ("cpu", "gpu"):
        text = (Path(CONF_DIR) / "cache" / f"{name}.yaml").read_text()
        assert "oc.env" not in text
        for default in (CS.DEFAULT_MAX_ENTRIES, CS.DEFAULT_MAX_BYTES, CS.DEFAULT_HOT_MAX_BYTES):
            assert f": {default}" not in text and f",{default}" not in text


# -- through the command line: exit 2, one line, no run folder ---------------------------------

CLI = [
    (["task.max_steps=abc"], {}, "task.max_steps"),
    (["+task.max_step=10"], {}, "task.max_step"),
    (["attention.segment_lengths=[64.5,128,256]"], {}, "attention.segment_lengths"),
    (["task.max_step=10"], {}, "task.max_step"),  # Hydra's own composition error, as one line
    (["cache=cpu"], {"PATTERN_CACHE_MAX_SIZE": "abc"}, "PATTERN_CACHE_MAX_SIZE"),
]


@pytest.mark.parametrize(("args", "env", "field"), CLI, ids=[",".join(a) for a, _, _ in CLI])
def test_cli_one_line_exit_2_no_run_folder(dilexp_cli, tmp_path: Path, args: list[str], env: dict[str, str],
                                           field: str) -> None:
    proc = dilexp_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dilexp: config error: ") and field in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_job_in_a_sweep_is_recorded_and_the_sweep_goes_on(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["-m", "task.max_steps=abc,1", "debug=fast_dev_run", "logger=none", "cache=cpu",
                       "memory=bucketed", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=300)
    assert "task.max_steps='abc'" in proc.stderr
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert summaries["0"]["status"] == "failed" and "task.max_steps" in summaries["0"]["error"]
    assert summaries["1"]["status"] == "completed"
    # The recorded config holds the checked, typed values.
    config = summaries["1"]["config"]
    assert config["task"]["max_steps"] == 1
    # Environment-backed values as their types: not '256', not '1GiB'.
    assert config["cache"]["max_entries"] == CS.DEFAULT_MAX_ENTRIES and config["memory"]["max_bytes"] == 1 << 30
