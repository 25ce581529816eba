"""Bad settings fail before any work, with one line that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dilexp.errors import ConfigError
from dilexp.main import _prepare

BAD = [
    (["attention.dilation_rates=[1,2]"], "attention.dilation_rates"),
    (["attention.dilation_rates=[1,0,4]"], "attention.dilation_rates"),
    (["attention.segment_lengths=[64,0,256]"], "attention.segment_lengths"),
    (["model.n_head=3"], "model.n_head"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data=text", "data.path=/nonexistent/corpus.txt"], "data.path"),
    (["data=text"], "data.path"),
    (["task.max_steps=0"], "task.max_steps"),
    (["attention=sdpa", "+attention.window=3"], "attention.window"),
    (["cache.strategy=bogus"], "cache.strategy"),
    (["attention=sdpa", "memory=bucketed"], "memory.kind"),  # a pool sdpa would never use
]


@pytest.mark.parametrize(("overrides", "field"), BAD, ids=[b[1] + ":" + ",".join(b[0]) for b in BAD])
def test_bad_setting_names_its_field(compose_cfg, overrides: list[str], field: str) -> None:
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        _prepare(cfg)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_empty_text_file_is_an_error(compose_cfg, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = compose_cfg(["data=text", f"data.path={empty}"])
    with pytest.raises(ConfigError, match="data.path"):
        _prepare(cfg)


@pytest.mark.parametrize(
    ("args", "field"),
    [(["attention.dilation_rates=[1,2]"], "attention.dilation_rates"),
     (["data=text", "data.path=missing.txt"], "data.path")],
)
def test_cli_exits_nonzero_with_one_line_and_leaves_no_folder(dilexp_cli, tmp_path: Path, args: list[str],
                                                             field: str) -> None:
    proc = dilexp_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("dilexp: config error:")]
    assert len(errors) == 1 and field in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_option_keeps_hydras_error(dilexp_cli, tmp_path: Path) -> None:
    proc = dilexp_cli(["attention=nonexistent"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr and "attention" in proc.stderr
