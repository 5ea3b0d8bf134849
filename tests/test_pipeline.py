"""Whole pipelines in one process on tiny random models: every pipeline, the teacher cache, G > 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ia2ray.config import load_run_config
from ia2ray.core.items import PIPELINE_STAGES
from ia2ray.core.pipeline import run_pipeline
from ia2ray.core.rundata import prepare_data

FAST = ["train.max_epochs=3", "data.val_size=8", "data.test_size=8", "eval.icl_draws=2", "data.n=4"]


def _cfg(tmp_path, *extra):
    return load_run_config(None, [*FAST, f"capture.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("pipeline", list(PIPELINE_STAGES))
def test_every_pipeline_runs_and_reports_val_and_test(tmp_path, pipeline):
    out = run_pipeline(_cfg(tmp_path, f"pipeline={pipeline}"), progress=False)
    s = out.summary
    assert [st["name"] for st in s["stages"]] == [name for name, *_ in PIPELINE_STAGES[pipeline]]
    for split in ("val", "test"):
        assert 0.0 <= s[split]["acc"] <= 1.0 and 0.0 <= s[split]["ece"] <= 1.0
        assert s[split]["n"] == 8
        assert 0.0 <= s["icl"][split]["acc"] <= 1.0 and s["icl"][split]["draws"] == 2
    json.dumps(s)  # the summary is JSON-ready


def test_teacher_is_captured_once_per_key_and_reused(tmp_path, caplog):
    cfg = _cfg(tmp_path, "pipeline=ia2", "eval.icl_baseline=false", "eval.similarity=false")
    with caplog.at_level("INFO", logger="ia2ray.core.teacher"):
        first = run_pipeline(cfg, progress=False).summary
        second = run_pipeline(cfg, progress=False).summary
    msgs = [r.getMessage() for r in caplog.records if "teacher capture" in r.getMessage()]
    assert len(msgs) == 2 and "computed" in msgs[0] and "cache hit" in msgs[1]
    assert first["val"] == second["val"] and first["stages"] == second["stages"]
    # a different N-shot seed is a different key
    run_pipeline(_cfg(tmp_path, "pipeline=ia2", "eval.icl_baseline=false", "data.seed=1", "eval.similarity=false"), progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_multi_token_task_aligns_several_positions(tmp_path):
    cfg = _cfg(tmp_path, "task.name=toy/reverse", "pipeline=ia2->sft", "align.layers=band:1:2",
               "eval.icl_baseline=false")
    s = run_pipeline(cfg, progress=False).summary
    assert s["aligned_layers"] == [1, 2]
    assert s["test"]["ece"] is None and 0.0 <= s["test"]["acc"] <= 1.0


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_other_architectures_run_ia2_sft(tmp_path, arch):
    cfg = _cfg(tmp_path, f"model.path=builtin:tiny-{arch}", "task.name=toy/polarity", "pipeline=ia2->sft",
               "eval.icl_baseline=false",
               "align.site=residual")
    s = run_pipeline(cfg, progress=False).summary
    assert len(s["stages"]) == 2 and s["stages"][0]["best_dev_loss"] < float("inf")


def test_layer_selection_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"align.layers: 'band:3:4' selects layers .* has 4 layers"):
        run_pipeline(_cfg(tmp_path, "align.layers=band:3:4"), progress=False)


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ia2ray.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_writes_summary_adapter_and_config(tmp_path):
    sets = [a for s in FAST for a in ("--set", s)]
    res = _run_cli(*sets, "--set", f"output.dir={tmp_path}/out", "--set", f"capture.cache_dir={tmp_path}/c",
                   "--json", str(tmp_path / "s.json"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["val"]) >= {"acc", "ece"} and set(s["test"]) >= {"acc", "ece"}
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file()
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in history} == {"align", "sft"} and history[0] == {**history[0], "step": 1}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["test"] == s["test"]


def test_cli_lists_every_config_error_and_exits_2(tmp_path):
    res = _run_cli("--set", "lora.rank=0", "--set", "train.lr=1", "--set", "pipeline=x", cwd=tmp_path)
    assert res.returncode == 2
    assert "3 problem(s)" in res.stderr and "lora.rank" in res.stderr and "train.lr: unknown key" in res.stderr


def test_cli_reports_bad_data_rows_before_training(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad"}\n{"text": "x", "label": 9}\n')
    res = _run_cli("--set", f"task.path={data}", "--set", f"output.dir={tmp_path}/out", cwd=tmp_path)
    assert res.returncode == 2
    assert f"{data}:2" in res.stderr and f"{data}:3" in res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_runs_a_study_file_with_its_defaults(tmp_path):
    root = Path(__file__).resolve().parents[1]
    res = _run_cli("--config", str(root / "search_spaces" / "tiny.yaml"), "--print-config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "rank: 8" in res.stdout and "name: tiny" in res.stdout


def test_prepare_data_fails_fast_on_small_pools(tmp_path):
    with pytest.raises(ValueError, match="train pool too small"):
        prepare_data(_cfg(tmp_path, "data.train_pool=5"))


def test_bfloat16_model_trains_and_evaluates(tmp_path):
    out = run_pipeline(_cfg(tmp_path, "model.dtype=bfloat16", "pipeline=ia2->sft", "eval.icl_baseline=false"),
                       progress=False)
    import torch

    base = {p.dtype for p in out.model.parameters() if not p.requires_grad}
    adapter = {p.dtype for p in out.model.parameters() if p.requires_grad}
    assert base == {torch.bfloat16} and adapter == {torch.float32}  # peft keeps adapter weights in fp32
    assert all(st["best_dev_loss"] < float("inf") for st in out.summary["stages"])
    assert 0.0 <= out.summary["test"]["acc"] <= 1.0


def test_layer_weights_pair_with_the_layers_in_the_given_order(tmp_path):
    base = ["pipeline=ia2", "eval.icl_baseline=false"]
    swapped = run_pipeline(_cfg(tmp_path, *base, "align.layers=[2, 0]", "align.layer_weights=[1.0, 0.0]"),
                           progress=False).summary
    only2 = run_pipeline(_cfg(tmp_path, *base, "align.layers=[2]"), progress=False).summary
    assert swapped["aligned_layers"] == [2, 0]
    assert swapped["stages"][0]["best_dev_loss"] == pytest.approx(only2["stages"][0]["best_dev_loss"], rel=1e-6)


def test_ia2_then_sft_continues_on_the_aligned_adapter(tmp_path):
    """The sft stage's step-0 dev loss (`train.keep_initial` checks it) is the CE of the adapter the
    align stage ended with."""
    from ia2ray.core.objective import StageObjective
    from ia2ray.core.items import stage_items
    from ia2ray.core.stages import dev_loss

    base = ["eval.icl_baseline=false", "train.keep_initial=true"]
    aligned = run_pipeline(_cfg(tmp_path, *base, "pipeline=ia2"), progress=False)
    data = prepare_data(_cfg(tmp_path))
    dev = stage_items(aligned.tokenizer, data.spec, data.splits.dev, "gold", None)
    ce_after_align = dev_loss(aligned.model, dev, StageObjective("sft"), aligned.tokenizer.pad_token_id, 4, "cpu")
    both = run_pipeline(_cfg(tmp_path, *base, "pipeline=ia2->sft"), progress=False)
    sft_start = next(h["dev_loss"] for h in both.history if h["stage"] == "sft" and "dev_loss" in h)
    assert sft_start == pytest.approx(ce_after_align, rel=1e-6)
    fresh = run_pipeline(_cfg(tmp_path, *base, "pipeline=sft"), progress=False)
    fresh_start = next(h["dev_loss"] for h in fresh.history if "dev_loss" in h)
    assert fresh_start != pytest.approx(sft_start, rel=1e-6)  # the align stage did change the adapter


def test_model_dependent_checks_are_reported_together_before_loading(tmp_path):
    from ia2ray.config import ConfigError
    from ia2ray.core.preflight import preflight

    cfg = _cfg(tmp_path, "align.layers=every:2", "align.layer_weights=[1.0]", "lora.layers=[1, 7]")
    with pytest.raises(ConfigError) as info:
        preflight(cfg, prepare_data(cfg))
    errors = info.value.errors
    assert len(errors) == 2, errors
    assert "align.layer_weights: 1 weights for the 2 layers" in errors[0]
    assert "lora.layers: [1, 7] selects layers [7] but the model has 4 layers" in errors[1]


def test_cli_exits_2_on_model_dependent_errors_and_too_small_icl_pool(tmp_path):
    res = _run_cli("--set", "align.layers=band:2:5", "--set", f"output.dir={tmp_path}/out", cwd=tmp_path)
    assert res.returncode == 2 and "align.layers: 'band:2:5' selects layers [4, 5, 6]" in res.stderr
    res = _run_cli("--set", "data.n=4", "--set", "data.train_pool=80", "--set", "data.val_size=73", "--set", "eval.icl_draws=3",
                   "--set", f"output.dir={tmp_path}/out", cwd=tmp_path)
    assert res.returncode == 2 and "ICL pool too small" in res.stderr
    res = _run_cli("--set", "model.path=/nonexistent/model", "--set", f"output.dir={tmp_path}/out", cwd=tmp_path)
    assert res.returncode == 2 and "model.path: '/nonexistent/model' is not a folder" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def _untimed(summary: dict) -> dict:
    """A summary without what depends on the clock or on whether weights were read."""
    out = {k: v for k, v in summary.items() if k not in ("timings", "model_loads", "driver_model_loads")}
    out["stages"] = [{k: v for k, v in st.items() if k not in ("seconds", "timings")} for st in summary["stages"]]
    return out


def test_a_warm_run_on_a_kept_model_equals_a_cold_one(tmp_path, monkeypatch):
    """`keep_model` (a warm Tune trial actor): after runs with another adapter shape and a run that
    failed mid-stage, the kept base model gives exactly the adapter and metrics of a fresh load."""
    import torch

    from ia2ray.core import model as model_mod
    from ia2ray.core.model import trainable_state
    from ia2ray.core.stages import NonFiniteLossError

    monkeypatch.setattr(model_mod, "_kept", None)  # this test's kept model goes when it ends
    cfg = _cfg(tmp_path, "pipeline=ia2->sft")
    cold = run_pipeline(cfg, progress=False)
    assert cold.summary["model_loads"] == 1
    other = run_pipeline(_cfg(tmp_path, "pipeline=sft", "lora.rank=4", "lora.targets=[q_proj, v_proj]", "eval.icl_baseline=false"),
                         progress=False, keep_model=True)
    assert other.summary["model_loads"] == 1
    with pytest.raises(NonFiniteLossError):
        run_pipeline(_cfg(tmp_path, "pipeline=ia2", "lr.align=1e30", "eval.icl_baseline=false"), progress=False,
                     keep_model=True)
    warm = run_pipeline(cfg, progress=False, keep_model=True)
    assert warm.summary["model_loads"] == 0
    assert warm.model.get_base_model() is other.model.get_base_model()  # the same weights in memory
    assert _untimed(warm.summary) == _untimed(cold.summary) and warm.history == cold.history
    a, b = trainable_state(cold.model), trainable_state(warm.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another model config replaces the kept model
    qwen3 = _cfg(tmp_path, "pipeline=sft", "model.path=builtin:tiny-qwen3", "task.name=toy/polarity",
                 "eval.icl_baseline=false")
    assert run_pipeline(qwen3, progress=False, keep_model=True).summary["model_loads"] == 1
