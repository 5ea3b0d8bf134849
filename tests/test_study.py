"""The study layer without a Ray cluster: the search space, bad input, --dry-run, resources, the
Pareto front read from Optuna, and the report's arithmetic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ia2ray.config import ConfigError, load_study_file
from ia2ray.config.schema import RunConfig
from ia2ray.study.driver import check_layers, prepare_study
from ia2ray.study.plan import plan_trials
from ia2ray.study.space import apply_params, check_space, decode_point, optuna_space
from ia2ray.tune import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
# depths of the paper's models (config.json num_hidden_layers), for the paper-scale study files
PAPER_DEPTHS = {"Qwen/Qwen3-4B-Base": 36, "meta-llama/Llama-3.2-1B": 16}


def write_study(tmp_path, params: str, extra: str = "") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text("name: t\nmodel:\n  path: builtin:tiny-llama\ntask:\n  name: toy/polarity\n"
                    "data:\n  n: 4\n  val_size: 8\n  test_size: 8\n  train_pool: 64\n  eval_pool: 32\n"
                    f"{extra}search:\n  params:\n{params}")
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_validates(path, tmp_path):
    study, where = load_study_file(path)
    base = check_space(study, where, str(path))
    assert study.search.params, "a shipped study searches something"
    if base.model.path in PAPER_DEPTHS:  # hub models: no download here, check layers against the known depth
        check_layers(study, PAPER_DEPTHS[base.model.path], str(path))
        assert base.train.use_gpu and base.train.num_workers >= 1
    elif base.model.path == "builtin:smollm2":  # package model on hub data: the `real` step runs its checks
        check_layers(study, 30, str(path))
    else:
        prepared = prepare_study(str(path), [], str(tmp_path / "studies"), resume=False)
        assert prepared.has_ece and not (tmp_path / "studies").exists()


def test_dry_run_prints_space_trials_and_resources_and_writes_nothing(tmp_path, capsys):
    storage = tmp_path / "studies"
    assert main(["--config", str(SMOKE), "--storage", str(storage), "--set", "study.num_trials=5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 5" in out and "align.layers: choice" in out and 'lr.align: loguniform' in out
    assert "Ray Train workers: 1 x (CPU=1)" in out and "concurrent trials:" in out
    assert "trial driver: CPU 0, GPU 0, memory 0.75 GiB" in out and "per trial: CPU 1, GPU 0, memory 0.75 GiB" in out
    assert main(["--config", str(SMOKE), "--storage", str(storage), "--set", "train.num_workers=0", "--dry-run"]) == 0
    assert re.search(r"trial driver: CPU 1, GPU 0, memory 1\.\d\d GiB", capsys.readouterr().out)
    assert "teacher captures before the trials: 2" in out  # one seed x two sites
    assert f"MLflow: sqlite:///{storage / 'mlflow.db'}, experiment smoke" in out
    assert not storage.exists()
    assert main(["--config", str(SMOKE), "--storage", str(storage), "--tracking-uri", "none", "--dry-run"]) == 0
    assert "MLflow: off" in capsys.readouterr().out


@pytest.mark.parametrize("params, extra, overrides, expected", [
    ("    lora.rnk: {kind: choice, values: [4]}\n", "", [], "search.params.lora.rnk: no such config key"),
    ("    lora.rank: {kind: choice, values: [4]}\n", "study:\n  num_trails: 3\n", [], "study.num_trails: unknown key"),
    ("    lora.rank: {kind: choice, values: [4, 0]}\n", "", [], "search.params.lora.rank.values[1] = 0"),
    ("    lora.rank: {kind: choice, values: [4, 2.5]}\n", "", [], "search.params.lora.rank.values[1] = 2.5"),
    ("    lora.rank: {kind: int, low: 2, high: 8.5}\n", "", [], "search.params.lora.rank: an int parameter needs"),
    ("    align.layers: {kind: choice, values: [all, 'band:3:4']}\n", "", [],
     "search.params.align.layers.values[1]"),
    ("    align.layers: {kind: choice, values: [all, [0, 9]]}\n", "", [], "search.params.align.layers.values[1]"),
    ("    data.n: {kind: choice, values: [4, 8]}\n", "", [], "search.params.data.n: not searchable"),
    ("    lr.align: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}\n", "", ["--set", "search.params={}"],
     "search.params: the search space is empty"),
])
def test_bad_input_is_a_clear_error_before_anything_starts(tmp_path, capsys, params, extra, overrides, expected):
    path = write_study(tmp_path, params, extra)
    storage = tmp_path / "studies"
    assert main(["--config", str(path), "--storage", str(storage), *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not storage.exists()


def test_layer_errors_name_the_model_depth(tmp_path):
    path = write_study(tmp_path, "    align.layers: {kind: choice, values: [all, 'band:3:4', [0, 9]]}\n")
    with pytest.raises(ConfigError) as info:
        prepare_study(str(path), [], str(tmp_path / "s"), resume=False)
    assert "4 layers" in str(info.value) and len(info.value.errors) == 2


def test_unreachable_storage_and_existing_study_are_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["--config", str(SMOKE), "--storage", str(blocker / "studies")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # writable by permissions for root, but no folder can be made there
        assert main(["--config", str(SMOKE), "--storage", "/proc/ia2ray", "--dry-run"]) == 2
        assert "--storage / study.storage = '/proc/ia2ray': cannot create a folder in /proc" in capsys.readouterr().err
    assert main(["--config", str(SMOKE), "--storage", "ftp://host/studies"]) == 2  # buckets: test_mirror.py
    assert "--storage / study.storage = 'ftp://host/studies': unsupported scheme 'ftp'" in capsys.readouterr().err
    # under `ray job submit --working-dir .` (the variable Ray's job supervisor sets for the entrypoint)
    job = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}, "metadata": {}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
        assert main(["--config", str(SMOKE), "--storage", "studies", "--dry-run"]) == 2
        assert "a relative path inside a Ray job" in capsys.readouterr().err
        assert main(["--config", str(SMOKE), "--storage", str(tmp_path / "abs"), "--dry-run"]) == 0
    existing = tmp_path / "studies" / "smoke"
    existing.mkdir(parents=True)
    (existing / "study.json").write_text("{}")
    assert main(["--config", str(SMOKE), "--storage", str(tmp_path / "studies")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err
    assert main(["--config", str(SMOKE), "--storage", str(tmp_path / "other"), "--resume"]) == 2
    assert "no study named 'smoke'" in capsys.readouterr().err
    for flag in (["--tracking-uri", str(tmp_path / "mlruns")], ["--set", "study.tracking_uri=file:///tmp/mlruns"]):
        assert main(["--config", str(SMOKE), "--storage", str(tmp_path / "new"), *flag, "--dry-run"]) == 2
        assert "--tracking-uri / study.tracking_uri:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_resume_refuses_a_changed_study(tmp_path, capsys):
    storage = tmp_path / "studies"
    prepared = prepare_study(str(SMOKE), [], str(storage), resume=False)
    prepared.study_dir.mkdir(parents=True)
    (prepared.study_dir / "study.json").write_text(json.dumps({"study": prepared.study.model_dump(mode="json")}))
    assert prepare_study(str(SMOKE), [], str(storage), resume=True).study == prepared.study
    # where the runs are logged may change on resume
    assert prepare_study(str(SMOKE), ["study.tracking_uri=none"], str(storage), resume=True).tracking_uri is None
    with pytest.raises(ConfigError) as info:
        prepare_study(str(SMOKE), ["lora.alpha=4", "study.num_trials=9"], str(storage), resume=True)
    assert [e.split(" differs")[0] for e in info.value.errors] == ["--resume: lora.alpha", "--resume: study.num_trials"]


def test_list_choices_reach_optuna_as_text_and_come_back_as_lists(tmp_path):
    study, where = load_study_file(SMOKE)
    space = optuna_space(study)
    assert space["align.layers"].choices == ("all", "band:0:2", "[1, 3]")
    point = decode_point(study, {"align.layers": "[1, 3]", "lora.rank": 4, "lr.align": 0.002, "align.site": "residual"})
    assert point["align.layers"] == [1, 3]
    cfg = apply_params(check_space(study, where), point, name="x")
    assert cfg.align.layers == [1, 3] and cfg.lora.rank == 4 and cfg.align.site == "residual" and cfg.name == "x"


@pytest.mark.parametrize("train, study, cluster, driver, per_trial, concurrency", [
    ({"num_workers": 1}, {}, {"CPU": 2}, {"CPU": 0}, {"CPU": 1}, 2),
    ({"num_workers": 2}, {"num_trials": 16}, {"CPU": 7}, {"CPU": 0}, {"CPU": 2}, 3),
    ({"num_workers": 2, "cpus_per_worker": 2}, {"driver_cpus": 0.5, "num_trials": 16}, {"CPU": 20}, {"CPU": 0.5},
     {"CPU": 4.5}, 4),
    ({"num_workers": 1}, {"num_trials": 16}, {"CPU": 64, "GPU": 8}, {"CPU": 0}, {"CPU": 1, "GPU": 1}, 8),
    ({"num_workers": 0}, {"num_trials": 16}, {"CPU": 2}, {"CPU": 1}, {"CPU": 1}, 2),
    ({"num_workers": 1}, {"max_concurrent": 5}, {"CPU": 2}, {"CPU": 0}, {"CPU": 1}, 5),
    ({"num_workers": 1}, {"num_trials": 2}, {"CPU": 32}, {"CPU": 0}, {"CPU": 1}, 2),
])
def test_trial_resources_and_concurrency(train, study, cluster, driver, per_trial, concurrency):
    """CPUs and GPUs per trial and the concurrency they allow (memory plenty: a Ray Train driver asks
    for DRIVER_BYTES, which loads no weights; an in-process trial of a hub model for none)."""
    from ia2ray.config.schema import StudyConfig, StudyFile
    from ia2ray.study.plan import DRIVER_BYTES

    sf = StudyFile(train=train, study=StudyConfig(**study))
    plan = plan_trials(sf, RunConfig(train=train), {**cluster, "memory": 2**40})
    memory = {"memory": DRIVER_BYTES} if train["num_workers"] else {}
    assert {k: v for k, v in plan.driver.items()} == {**driver, **memory}
    assert {k: v for k, v in plan.per_trial.items() if v} == {**per_trial, **memory}
    assert plan.concurrency == concurrency


def test_in_process_trials_reserve_the_memory_of_their_model(tiny_checkpoints):
    """`train.num_workers: 0`: the trial holds the model, so it reserves the weights (in `model.dtype`,
    read from the safetensors headers) plus RUNTIME_BYTES, or `study.trial_memory_gb`; memory caps the
    concurrency like CPUs do. A driver of Train workers loads no weights: it reserves DRIVER_BYTES, or
    `study.trial_memory_gb`."""
    from ia2ray.config.schema import StudyConfig, StudyFile
    from ia2ray.core.model import load_model, weight_bytes
    from ia2ray.study.plan import DRIVER_BYTES, RUNTIME_BYTES

    tiny_checkpoints("llama")
    cfg = RunConfig(model={"path": "builtin:tiny-llama"}, train={"num_workers": 0})
    n_params = sum(p.numel() for p in load_model(cfg.model)[0].parameters())
    assert weight_bytes(cfg.model) == 4 * n_params
    assert weight_bytes(cfg.model.model_copy(update={"dtype": "bfloat16"})) == 2 * n_params
    assert weight_bytes(cfg.model.model_copy(update={"path": "org/not-local"})) is None
    need = 4 * n_params + RUNTIME_BYTES
    sf = StudyFile(train={"num_workers": 0}, study=StudyConfig(num_trials=16))
    plan = plan_trials(sf, cfg, {"CPU": 8, "memory": 3.5 * need}, weight_bytes(cfg.model))
    assert plan.driver == {"CPU": 1, "memory": need} and plan.concurrency == 3
    assert plan.describe()[0] == f"trial driver: CPU 1, GPU 0, memory {need / 2**30:.2f} GiB"
    sf = StudyFile(train={"num_workers": 0}, study=StudyConfig(num_trials=16, trial_memory_gb=0.5))
    assert plan_trials(sf, cfg, {"CPU": 8, "memory": 2**31}, None).driver == {"CPU": 1, "memory": 2**29}
    workers = RunConfig(train={"num_workers": 1})
    plan = plan_trials(StudyFile(train={"num_workers": 1}), workers, {"CPU": 8, "memory": 3.5 * DRIVER_BYTES}, 10**9)
    assert plan.driver == {"CPU": 0, "memory": DRIVER_BYTES} and plan.concurrency == 3  # not the weights: no model
    sf = StudyFile(train={"num_workers": 1}, study=StudyConfig(trial_memory_gb=0.5))
    assert plan_trials(sf, workers, {"CPU": 8, "memory": 2**31}, 10**9).driver == {"CPU": 0, "memory": 2**29}
    # drivers on nodes with a custom resource: its count per node bounds them, no memory request (an
    # autoscaler could not launch a node for it when the node type does not declare memory)
    sf = StudyFile(train={"num_workers": 1}, study=StudyConfig(driver_resources={"trial_driver": 1}))
    assert plan_trials(sf, workers, {"CPU": 8}, 10**9).driver == {"CPU": 0, "trial_driver": 1}


def test_pareto_front_is_read_from_the_optuna_database(tmp_path):
    import optuna

    from ia2ray.study.search import completed_trials, optuna_url, pareto_front
    from ia2ray.study.trial import objectives

    study, _ = load_study_file(SMOKE)
    space = optuna_space(study)
    ot = optuna.create_study(study_name=study.name, storage=optuna_url(tmp_path), directions=["maximize", "minimize"])
    points = [(0.9, 0.20, "all"), (0.8, 0.05, "[1, 3]"), (0.7, 0.10, "all"), (0.95, 0.30, "band:0:2")]
    for acc, ece, layers in points:
        params = {"align.layers": layers, "align.site": "attn_out", "lora.rank": 4, "lr.align": 1e-3}
        ot.add_trial(optuna.trial.create_trial(params=params, distributions=space, values=[acc, ece]))
    front = pareto_front(study, tmp_path, has_ece=True)
    assert [f["values"]["val/acc"] for f in front] == [0.95, 0.9, 0.8]  # (0.7, 0.10) is dominated by (0.8, 0.05)
    assert front[2]["params"]["align.layers"] == [1, 3]
    assert len(completed_trials(study, tmp_path)) == 4
    assert objectives(study, has_ece=False) == [("val/acc", "max")]


def test_scalar_objective_is_acc_minus_lambda_ece():
    from ia2ray.config.schema import StudyConfig, StudyFile
    from ia2ray.study.trial import objective_metrics, objectives

    sf = StudyFile(study=StudyConfig(objective="scalar", ece_weight=2.0))
    m = objective_metrics([{"val": {"acc": 0.75, "ece": 0.125, "nll": 0.5}}], sf)
    assert m == {"val/acc": 0.75, "val/ece": 0.125, "objective": 0.5, "val/nll": 0.5,
                 "val/acc_std": 0.0, "val/ece_std": 0.0, "val/nll_std": 0.0}
    assert objectives(sf, has_ece=True) == [("objective", "max")]


def test_search_objective_is_the_mean_over_the_search_subsets():
    """Three subsets: each metric's mean and sample std; the objective from the means; a metric one
    subset lacks (nll) is left out rather than averaged over fewer subsets."""
    from ia2ray.config.schema import StudyConfig, StudyFile
    from ia2ray.study.trial import objective_metrics

    sf = StudyFile(study=StudyConfig(objective="scalar", ece_weight=0.5, search_seeds=[0, 1, 2]))
    summaries = [{"val": {"acc": 0.5, "ece": 0.25, "nll": 1.0}}, {"val": {"acc": 0.75, "ece": 0.125}},
                 {"val": {"acc": 1.0, "ece": 0.0, "nll": 0.5}}]
    m = objective_metrics(summaries, sf)
    assert m["val/acc"] == 0.75 and m["val/acc_std"] == 0.25
    assert m["val/ece"] == 0.125 and m["val/ece_std"] == 0.125
    assert m["objective"] == 0.75 - 0.5 * 0.125
    assert "val/nll" not in m


def test_report_table_has_mean_and_sample_std_per_method(tmp_path):
    from ia2ray.study.report import summarise, table_csv, table_markdown

    runs = {"IA2 -> SFT": [{"seed": s, "params": {"pipeline": "ia2->sft"}, "test": {"acc": a, "ece": e},
                            "val": {"acc": 0.5, "ece": 0.1}} for s, a, e in [(0, 0.5, 0.1), (1, 0.7, 0.3)]],
            "ICL": [{"seed": 0, "params": {}, "test": {"acc": 0.6, "ece": 0.2}, "val": {"acc": 0.6, "ece": 0.2}}]}
    table = summarise(runs)
    assert table[0]["test_acc_mean"] == pytest.approx(0.6) and table[0]["test_acc_std"] == pytest.approx(0.1414213562)
    assert table[0]["test_ece_mean"] == pytest.approx(0.2) and table[1]["test_acc_std"] == 0.0
    csv_text = table_csv(table)
    assert csv_text.splitlines()[1].startswith("IA2 -> SFT,2,0 1,0.600000,0.141421,0.200000,0.141421")
    assert "| ICL | 0 | 0.6000 ± 0.0000 | 0.2000 ± 0.0000 |" in table_markdown(table, "equal_mass")


def test_a_trial_never_runs_the_teacher_itself(tmp_path):
    from ia2ray.config import load_run_config
    from ia2ray.core.pipeline import run_pipeline
    from ia2ray.core.teacher import TeacherNotCachedError

    cfg = load_run_config(SMOKE, [f"capture.cache_dir={tmp_path / 'empty'}", "train.num_workers=0",
                                  "eval.icl_baseline=false"])
    with pytest.raises(TeacherNotCachedError, match="not in the cache"):
        run_pipeline(cfg, progress=False, splits=("val",), cached_teacher_only=True)
    assert not list((tmp_path / "empty").rglob("manifest.json"))


def test_scalar_study_ranks_completed_trials_by_the_objective(tmp_path):
    import optuna

    from ia2ray.study.search import optuna_url, pareto_front

    study, _ = load_study_file(SMOKE, ["study.objective=scalar"])
    space = optuna_space(study)
    ot = optuna.create_study(study_name=study.name, storage=optuna_url(tmp_path), direction="maximize")
    for value, rank in [(0.5, 4), (0.8, 8), (0.6, 4)]:
        params = {"align.layers": "all", "align.site": "attn_out", "lora.rank": rank, "lr.align": 1e-3}
        ot.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    front = pareto_front(study, tmp_path, has_ece=True)
    assert [f["values"]["objective"] for f in front] == [0.8, 0.6, 0.5] and front[0]["params"]["lora.rank"] == 8


EXPECTED_KEYS = {
    "ia2->sft": {"pipeline", "align.layers", "align.site", "lora.rank", "lr.align", "lr.sft"},
    "ia2": {"pipeline", "align.layers", "align.site", "lora.rank", "lr.align"},
    "ia2+sft": {"pipeline", "align.layers", "align.site", "loss.ce_weight", "lora.rank", "lr.align"},
}


def test_conditional_space_samples_only_the_keys_each_pipeline_uses(tmp_path):
    """The default study's space through Optuna's multivariate TPE (two objectives, as the study runs
    it): `loss.ce_weight` only for ia2+sft, `lr.sft` only for ia2->sft; through Ray's OptunaSearch too,
    whose searcher survives the pickling Tune does to save it."""
    import optuna

    from ia2ray.study.search import make_searcher, tpe_sampler
    from ia2ray.study.space import ConditionalSpace

    study, _ = load_study_file(ROOT / "search_spaces" / "testbed.yaml")
    space = ConditionalSpace(study)
    ot = optuna.create_study(directions=["maximize", "minimize"], sampler=tpe_sampler(0))
    seen = set()
    for i in range(24):
        trial = ot.ask()
        space(trial)
        assert set(trial.params) == EXPECTED_KEYS[trial.params["pipeline"]], trial.params
        seen.add(trial.params["pipeline"])
        ot.tell(trial, [0.5 + 0.01 * i, 0.1])
    assert seen == set(EXPECTED_KEYS)  # every branch was sampled, also after the 10 random start-up trials

    searcher = make_searcher(study, tmp_path, has_ece=True)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    for config in configs:
        assert set(config) == EXPECTED_KEYS[config["pipeline"]]
    searcher.save(str(tmp_path / "searcher.pkl"))
    again = make_searcher(study, tmp_path, has_ece=True)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert set(again.suggest("t9")) <= set().union(*EXPECTED_KEYS.values())


def test_dry_run_prints_the_conditional_structure(capsys):
    from ia2ray.tune import main

    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sampled per pipeline" in out
    assert "  ia2+sft: align.layers, align.site, loss.ce_weight, lora.rank, lr.align" in out
    assert "  ia2: align.layers, align.site, lora.rank, lr.align" in out
    assert "multivariate" in out and "subsets 0 1 2" in out


def test_baseline_tuning_picks_the_rate_with_the_best_validation_mean():
    from ia2ray.config.schema import ConfirmConfig, StudyConfig, StudyFile
    from ia2ray.study.confirm import confirmation_rows, pick_rates

    grid = [1e-3, 3e-3, 1e-2]
    results = [  # mean validation metrics of each (method, rate) over the search subsets
        {"method": "sft", "lr": 1e-3, "metrics": {"val/acc": 0.70, "val/ece": 0.10, "objective": 0.60}},
        {"method": "sft", "lr": 3e-3, "metrics": {"val/acc": 0.80, "val/ece": 0.30, "objective": 0.50}},
        {"method": "sft", "lr": 1e-2, "metrics": {"val/acc": 0.80, "val/ece": 0.20, "objective": 0.60}},
        {"method": "ia2", "lr": 1e-3, "metrics": {"val/acc": 0.60, "val/ece": 0.20, "objective": 0.40}},
        {"method": "ia2", "lr": 3e-3, "metrics": {"val/acc": 0.60, "val/ece": 0.20, "objective": 0.40}},
    ]
    pareto = StudyFile(study=StudyConfig(confirm=ConfirmConfig(baseline_lrs=grid)))
    chosen = pick_rates(pareto, results, has_ece=True)
    assert {m: c["lr"] for m, c in chosen.items()} == {"sft": 1e-2, "ia2": 1e-3}  # acc, then ECE, then grid order
    scalar = StudyFile(study=StudyConfig(objective="scalar", confirm=ConfirmConfig(baseline_lrs=grid)))
    assert pick_rates(scalar, results, has_ece=True)["sft"]["lr"] == 1e-3  # 0.60 first in the grid
    rows = confirmation_rows(pareto, [], chosen, 0)
    sft = next(r for r in rows if r["label"] == "SFT only" and r["seed"] == 0)
    assert sft["params"] == {"pipeline": "sft", "lr.align": 1e-2, "lr.sft": 1e-2}
    assert sft["tuned"].startswith("lr in {0.001, 0.003, 0.01} -> 0.01")
    ia2sft = next(r for r in rows if r["label"] == "IA2 -> SFT")  # no rate of its grid finished
    assert ia2sft["params"] == {"pipeline": "ia2->sft"} and ia2sft["tuned"].startswith("defaults")


def test_trials_a_kill_left_running_are_closed_as_failed(tmp_path):
    """After the search nothing runs: an Optuna trial still RUNNING was interrupted and not restored."""
    import optuna

    from ia2ray.study.search import close_stale_trials, optuna_url

    study, _ = load_study_file(SMOKE, ["study.objective=scalar"])
    ot = optuna.create_study(study_name=study.name, storage=optuna_url(tmp_path), direction="maximize")
    done = ot.ask()
    ot.tell(done, 0.5)
    ot.ask()  # started, never told: its trial was killed
    assert close_stale_trials(study, tmp_path) == 1
    states = [t.state for t in optuna.load_study(study_name=study.name, storage=optuna_url(tmp_path)).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    interrupted = optuna.load_study(study_name=study.name, storage=optuna_url(tmp_path)).trials[1]
    assert "interrupted" in interrupted.user_attrs["ia2ray_interrupted"]
    assert close_stale_trials(study, tmp_path) == 0


def test_report_compares_each_method_with_sft_and_icl_paired_by_seed(tmp_path):
    """Paired by seed (a method's seed 3 has no partner and is left out), t-test p-values equal to
    scipy's `ttest_rel`, ECE judged lower-is-better; in report.csv, report.md and the table rows."""
    from scipy.stats import ttest_rel

    from ia2ray.study.report import paired_markdown, summarise, table_csv

    def runs_of(values):
        return [{"seed": s, "params": {}, "test": {"acc": a, "ece": e}, "val": {"acc": a, "ece": e}}
                for s, (a, e) in values.items()]

    runs = {"ICL": runs_of({0: (0.60, 0.20), 1: (0.62, 0.22), 2: (0.58, 0.18)}),
            "SFT only": runs_of({0: (0.50, 0.30), 1: (0.55, 0.28), 2: (0.52, 0.35)}),
            "best-1": runs_of({0: (0.70, 0.10), 1: (0.74, 0.12), 2: (0.69, 0.11), 3: (0.1, 0.9)})}
    table = {r["method"]: r for r in summarise(runs)}
    best = table["best-1"]
    acc, sft_acc = [0.70, 0.74, 0.69], [0.50, 0.55, 0.52]
    assert best["vs_sft_test_acc_diff"] == pytest.approx(sum(a - b for a, b in zip(acc, sft_acc)) / 3)
    assert best["vs_sft_test_acc_p"] == pytest.approx(ttest_rel(acc, sft_acc).pvalue, rel=1e-9)
    assert best["vs_sft_test_acc_n"] == 3 and best["vs_sft_test_acc_verdict"] == "better"
    ece, icl_ece = [0.10, 0.12, 0.11], [0.20, 0.22, 0.18]
    assert best["vs_icl_test_ece_p"] == pytest.approx(ttest_rel(ece, icl_ece).pvalue, rel=1e-9)
    assert best["vs_icl_test_ece_verdict"] == "better"  # lower ECE
    assert table["SFT only"]["vs_icl_test_acc_verdict"] == "worse"
    assert "vs_sft_test_acc_diff" not in table["SFT only"] and "vs_icl_test_acc_diff" not in table["ICL"]
    header = table_csv(list(table.values())).splitlines()[0].split(",")
    assert "vs_sft_test_acc_p" in header and "vs_icl_test_ece_verdict" in header
    md = paired_markdown(list(table.values()))
    assert "| best-1 | SFT only | 3 | +0.1867 [" in md and "| better |" in md
