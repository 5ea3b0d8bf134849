"""Config loading: defaults, overrides, all-errors-at-once reporting, study files, docs in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ia2ray.config import ConfigError, RunConfig, load_run_config, parse_override
from ia2ray.config.reference import END, START, example_yaml, markdown_reference

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_match_the_paper():
    cfg = load_run_config()
    assert isinstance(cfg, RunConfig)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (8, 8.0, 0.0)
    assert cfg.lora.targets == ["q_proj", "k_proj", "o_proj"]
    assert (cfg.train.batch_size, cfg.train.max_epochs, cfg.train.patience, cfg.train.eval_every) == (4, 50, 5, 2)
    assert (cfg.eval.ece_bins, cfg.eval.ece_scheme) == (15, "equal_mass")
    assert cfg.align.site == "attn_out" and cfg.loss.align == "mse"


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("lora.rank=16", "lora.rank", 16),
        ("lr.align=1e-4", "lr.align", 1e-4),
        ("align.layers=[0, 2]", "align.layers", [0, 2]),
        ("eval.icl_baseline=false", "eval.icl_baseline", False),
        ("pipeline=ia2+sft", "pipeline", "ia2+sft"),
        ("align.layers=band:1:2", "align.layers", "band:1:2"),
    ],
)
def test_overrides_are_parsed_as_yaml(text, key, value):
    assert parse_override(text) == (key, value)
    cfg = load_run_config(None, [text])
    section, _, leaf = key.rpartition(".")
    node = getattr(cfg, section) if section else cfg
    assert getattr(node, leaf) == value


def test_every_problem_is_reported_with_its_key_and_origin(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlora:\n  rank: 0\n  colour: red\ntrain:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, ["pipeline=nonsense", "align.layers=band:x"])
    errors = info.value.errors
    assert len(errors) == 5, errors
    text = "\n".join(errors)
    assert f"lora.rank: Input should be greater than or equal to 1 (got 0)  [{path}:3]" in text
    assert f"lora.colour: unknown key  [{path}:4]" in text
    assert "train.batch_size: Input should be a valid integer" in text and f"[{path}:6]" in text
    assert "pipeline: unknown pipeline 'nonsense'" in text and "[--set pipeline=nonsense]" in text
    assert "align.layers: must be 'all'" in text
    assert str(path) in str(info.value)


def test_bad_yaml_and_missing_file_and_bad_override_are_clear_errors(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("lora:\n  rank: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["lora.rank", "lora.rank.x=3"])
    assert len(info.value.errors) == 2
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        load_run_config(tmp_path / "list.yaml")


def test_layer_weights_must_match_an_explicit_layer_list():
    with pytest.raises(ConfigError, match="layer_weights has 1 entries"):
        load_run_config(None, ["align.layers=[0, 1]", "align.layer_weights=[1.0]"])
    cfg = load_run_config(None, ["align.layers=[0, 1]", "align.layer_weights=[1.0, 0.5]"])
    assert cfg.align.layer_weights == [1.0, 0.5]


def test_study_file_searched_parameters_take_their_defaults(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "lora": {"rank": 4},
                "search": {
                    "params": {
                        "lora.rank": {"kind": "choice", "values": [4, 8, 16], "default": 16},
                        "lr.align": {"kind": "loguniform", "low": 1e-4, "high": 1e-2, "default": 3e-4},
                        "loss.ce_weight": {"kind": "uniform", "low": 0.0, "high": 0.5},
                    }
                },
            }
        )
    )
    cfg = load_run_config(path)
    assert cfg.lora.rank == 16 and cfg.lr.align == 3e-4
    assert cfg.loss.ce_weight == RunConfig().loss.ce_weight  # no default given: the base value stays


def test_study_file_errors_name_the_searched_key(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "search:\n  params:\n    lora.rnk: {kind: choice, values: [1], default: 1}\n"
        "    lora.rank: {kind: choice, values: [0], default: 0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert any("search.params.lora.rnk: no such config key" in e for e in info.value.errors)
    path.write_text("search:\n  params:\n    lr.align: {kind: loguniform, low: 0, high: 1}\n")
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_run_config(path)


def test_docs_config_reference_is_generated_from_the_schema():
    page = (ROOT / "docs" / "config.md").read_text()
    assert f"{START}\n{markdown_reference()}{END}" in page, (
        "docs/config.md config reference is stale: paste markdown_reference() between its config-reference "
        "markers (python -m ia2ray.config.reference docs/config.md)")


def test_example_yaml_round_trips_to_the_defaults():
    data = yaml.safe_load(example_yaml())
    assert RunConfig.model_validate(data) == RunConfig()


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# python -m ia2ray.", "# RAY_AUTH_MODE=token ray job submit")) and path.name in first
    load_run_config(path)


def test_cli_help_lists_every_config_key():
    from ia2ray.config.reference import _fields, cli_help

    text = cli_help()
    keys = [key for key, _, _, is_section in _fields(RunConfig) if not is_section]
    assert len(keys) > 30 and all(f"\n  {k} = " in text for k in keys)
