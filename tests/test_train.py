"""Distributed stages on a real local Ray cluster with real DeepSpeed engines (CPU, gloo): 1 vs 2
workers, ZeRO-2 and ZeRO-3, resume-equals-uninterrupted (also at another worker count), incomplete
or foreign checkpoints, NaN losses."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ia2ray.config import load_run_config
from ia2ray.core.model import load_model, resolve_layers
from ia2ray.core.items import stage_work
from ia2ray.core.pipeline import train_in_process
from ia2ray.core.rundata import prepare_data
from ia2ray.core.teacher import capture_teacher
from ia2ray.core.sites import num_layers
from ia2ray.core.stages import NonFiniteLossError
from ia2ray.train.checkpoint import CheckpointError
from ia2ray.train.launch import StageRunError, fit
from ia2ray.train.ray_stages import make_job

BASE = ["task.name=toy/polarity", "data.n=8", "data.val_size=8", "data.test_size=8", "eval.icl_baseline=false",
        "train.batch_size=4", "train.max_epochs=3", "train.patience=50", "train.eval_every=2", "lr.align=1e-2",
        "lr.sft=1e-2", "align.layers=[0, 1]"]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    """(make(overrides) -> (cfg, job, parts), storage dir): the teacher is captured once for the module
    (the overrides must not change the data or the teacher)."""
    root = tmp_path_factory.mktemp("train")
    model_path = tiny_checkpoints("llama")
    cache: dict = {}

    def make(*overrides: str, pipeline: str = "ia2->sft"):
        cfg = load_run_config(None, [f"model.path={model_path}", f"capture.cache_dir={root / 'cache'}",
                                     f"pipeline={pipeline}", *BASE, *overrides])
        if "model" not in cache:
            cache["data"] = prepare_data(cfg)
            cache["model"], cache["tok"] = load_model(cfg.model)
            cache["teacher"] = capture_teacher(cfg, cache["model"], cache["tok"], cache["data"], progress=False)
        model, tok, teacher = cache["model"], cache["tok"], cache["teacher"]
        stages = stage_work(cfg, tok, cache["data"], resolve_layers(cfg.align.layers, num_layers(model)), teacher)
        return cfg, make_job(cfg, tok.pad_token_id, stages, teacher), (model, tok, stages, teacher)

    return make, root / "storage"


def _train_losses(finished, stage=0):
    return [h["train_loss"] for h in finished[stage]["history"] if "train_loss" in h]


def _strip(finished):
    return [{k: f[k] for k in ("result", "history")} for f in finished]


def _assert_same_adapter(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory):
    """The zero3 preset with no persistent parameters: even tiny LoRA matrices are partitioned."""
    from ia2ray.train.dsconfig import load_preset

    cfg = load_preset("zero3")
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3-partitioned.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("zero,batch,micro", [
    ("zero2", 4, None),
    ("zero2", 3, 1),  # 2 workers: 2 slots each, one of weight 0; 2 accumulation steps of 1 example
    ("zero3", 4, None),
])
def test_one_and_two_workers_take_the_same_steps(ray_cluster, setup, zero, batch, micro, zero3_json):
    make, storage = setup
    preset = zero3_json if zero == "zero3" else "zero2"
    micro_set = [f"train.micro_batch_size={micro}"] if micro else []
    outcomes = {}
    for workers in (1, 2):
        cfg, job = make(f"train.num_workers={workers}", f"train.deepspeed={preset}", f"train.batch_size={batch}",
                        *micro_set, pipeline="ia2")[:2]
        outcomes[workers] = fit(job, f"{zero}-b{batch}-w{workers}", str(storage))
    one, two = outcomes[1], outcomes[2]
    assert len(_train_losses(one.finished)) == 3 * -(-8 // batch)  # 8 examples, 3 epochs
    assert _train_losses(two.finished) == pytest.approx(_train_losses(one.finished), rel=1e-4)
    best1, best2 = (o.finished[0]["result"]["best_dev_loss"] for o in (one, two))
    assert best2 == pytest.approx(best1, rel=1e-4)
    _assert_same_adapter(one.adapter, two.adapter, atol=1e-5)
    assert _train_losses(one.finished)[-1] < _train_losses(one.finished)[0]  # it did learn

    # the single-process loop of the core library takes the same steps as one DeepSpeed worker
    cfg, _, (model, tok, stages, teacher) = make(f"train.batch_size={batch}", pipeline="ia2")
    _, results = train_in_process(cfg, _fresh(model), tok, stages, teacher)
    assert [h["train_loss"] for h in results[0][1] if "train_loss" in h] == pytest.approx(_train_losses(one.finished), rel=1e-4)

    if zero == "zero3":  # the adapter saved under ZeRO-3 is complete and loads with peft
        from peft import PeftModel

        adapter_dir = Path(two.checkpoint_dir) / "adapter"
        loaded = PeftModel.from_pretrained(_fresh(model), str(adapter_dir))
        weights = {k: p for k, p in loaded.named_parameters() if "lora_" in k}
        assert len(weights) == len(two.adapter) > 0
        for k, p in weights.items():
            assert p.numel() > 0
            torch.testing.assert_close(p.detach(), two.adapter[k], atol=1e-6, rtol=0)
        assert any(p.abs().sum() > 0 for k, p in weights.items() if "lora_B" in k)  # trained, not the zero init


def _fresh(model):
    import copy

    return copy.deepcopy(model)


def _metrics_recorder(path: Path):
    """A Ray Train callback (it runs in the Train controller process) that appends rank 0's reports to a file."""
    import ray.train

    class Recorder(ray.train.UserCallback):  # local class: pickled by value into the controller
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    return Recorder()


def test_resume_equals_uninterrupted(ray_cluster, setup):
    make, storage = setup
    overrides = ("train.num_workers=1", "train.checkpoint_every=2")
    cfg, job = make(*overrides)[:2]
    whole = fit(replace(job, train=job.train.model_copy(update={"report_every": 1})), "uninterrupted", str(storage),
                callbacks=[_metrics_recorder(storage / "reports.jsonl")])
    assert [f["result"]["name"] for f in whole.finished] == ["align", "sft"]
    # both stages take the same steps as the in-process loop (the sft stage's gradients are large
    # enough that DeepSpeed's default clipping at norm 1.0 would show here)
    cfg, _, (model, tok, stages, teacher) = make(*overrides)
    _, local = train_in_process(cfg, _fresh(model), tok, stages, teacher)
    for i, (summary, history) in enumerate(local):
        remote = whole.finished[i]["history"]
        assert [(h["step"], sorted(h)) for h in history] == [(h["step"], sorted(h)) for h in remote]
        assert len(history) > 5
        value = lambda h: h.get("train_loss", h.get("dev_loss"))  # noqa: E731
        assert [value(h) for h in history] == pytest.approx([value(h) for h in remote], rel=1e-5)
        assert summary["best_dev_loss"] == pytest.approx(whole.finished[i]["result"]["best_dev_loss"], rel=1e-5)

    # with train.report_every=1 every dev check reaches Ray Train's callbacks (what Tune will see);
    # each stage end reports too
    reports = [json.loads(line) for line in (storage / "reports.jsonl").read_text().splitlines()]
    checks = [(f["result"]["name"], h["step"], h["dev_loss"]) for f in whole.finished for h in f["history"] if "dev_loss" in h]
    assert [(r["stage"], r["step"], r["dev_loss"]) for r in reports if "dev_loss" in r] == checks
    assert [(r["stage"], r["step"]) for r in reports if r.get("stage_done")] == [
        (f["result"]["name"], f["result"]["steps"]) for f in whole.finished]

    # the workers die right after the checkpoint of align step 4; the same run name resumes from it
    with pytest.raises(StageRunError):
        fit(replace(job, crash_after=("align", 4)), "interrupted", str(storage))
    assert (storage / "interrupted" / "ckpt-0-align-000004" / "COMPLETE.json").is_file()
    resumed = fit(job, "interrupted", str(storage))
    _assert_same_adapter(whole.adapter, resumed.adapter)
    assert _strip(resumed.finished) == _strip(whole.finished)  # same histories: no step repeated or lost

    # with train.max_failures=1, Ray Train restarts the worker group inside the same fit(): it resumes too
    _, retrying = make(*overrides, "train.max_failures=1")[:2]
    restarted = fit(replace(retrying, crash_after=("sft", 4)), "restarted", str(storage))
    _assert_same_adapter(whole.adapter, restarted.adapter)
    assert _strip(restarted.finished) == _strip(whole.finished)

    # interrupted with 2 workers in the sft stage, resumed with 1
    _, job2 = make("train.num_workers=2", "train.checkpoint_every=2")[:2]
    with pytest.raises(StageRunError):
        fit(replace(job2, crash_after=("sft", 2)), "two-then-one", str(storage))
    moved = fit(job, "two-then-one", str(storage))
    _assert_same_adapter(whole.adapter, moved.adapter, atol=1e-5)
    assert _train_losses(moved.finished, 1) == pytest.approx(_train_losses(whole.finished, 1), rel=1e-4)


def test_incomplete_missing_or_foreign_checkpoints_are_errors(ray_cluster, setup):
    make, storage = setup
    _, job = make("train.num_workers=1", "train.checkpoint_every=2", pipeline="ia2")[:2]
    fit(job, "broken", str(storage))
    final = storage / "broken" / "ckpt-1-eval-end"  # the last checkpoint (after evaluation), registered in Ray's run snapshot

    # another configuration under the same name
    _, other = make("train.num_workers=1", "train.checkpoint_every=2", "lr.align=5e-3", pipeline="ia2")[:2]
    with pytest.raises(CheckpointError, match="different configuration"):
        fit(other, "broken", str(storage))

    (final / "COMPLETE.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(COMPLETE.json is missing\)"):
        fit(job, "broken", str(storage))

    shutil.rmtree(final)  # Ray's run snapshot still lists it
    with pytest.raises(StageRunError, match="ckpt-1-eval-end"):
        fit(job, "broken", str(storage))


def test_a_run_restarted_before_its_evaluation_evaluates_on_resume(ray_cluster, setup):
    """The workers die after the last stage's checkpoint, before evaluating: the same run name resumes
    there (no stage trains again) and evaluates the stored adapter on a freshly loaded model, giving the
    metrics of an uninterrupted run."""
    from ia2ray.core.runeval import eval_plan

    make, storage = setup
    cfg, job, (_, tok, _, _) = make("train.num_workers=1", "eval.icl_baseline=true", "eval.icl_draws=2", pipeline="ia2")
    job = replace(job, evals=eval_plan(cfg, prepare_data(cfg), ("val", "test")))
    whole = fit(job, "evaluated-whole", str(storage))
    assert set(whole.evals) == {"val", "test", "icl"} and whole.workers["model_loads"] == 1
    with pytest.raises(StageRunError):
        fit(replace(job, crash_after=("eval", 0)), "evaluated-restarted", str(storage))
    assert (storage / "evaluated-restarted" / "ckpt-0-align-end" / "COMPLETE.json").is_file()
    resumed = fit(job, "evaluated-restarted", str(storage))
    assert resumed.evals == whole.evals and resumed.answers == whole.answers
    assert _strip(resumed.finished) == _strip(whole.finished)
    _assert_same_adapter(whole.adapter, resumed.adapter)


def test_latest_complete_checkpoint_on_disk(tmp_path):
    from ia2ray.train import checkpoint as ckpt

    run = tmp_path / "run"
    for name in ("ckpt-0-align-000002", "ckpt-0-align-000004", "ckpt-0-align-end", "ckpt-1-sft-000002"):
        (run / name).mkdir(parents=True)
        ckpt.write_rank_part(run / name, 0)
        ckpt.write_state(run / name, {"fingerprint": "f"}, world_size=1)
    assert ckpt.latest_complete(run).name == "ckpt-1-sft-000002"
    (run / "ckpt-1-sft-000002" / "rank-0.pt").unlink()  # an upload cut short
    assert ckpt.latest_complete(run).name == "ckpt-0-align-end"
    (run / "ckpt-0-align-end" / "state.pt").write_bytes(b"truncated")
    assert ckpt.latest_complete(run).name == "ckpt-0-align-000004"
    assert ckpt.latest_complete(tmp_path / "never-started") is None
    assert [ckpt.progress(n) for n in ("ckpt-0-align-000004", "ckpt-0-align-end", "ckpt-1-sft-000002", "x")] == [
        (0, 4), (1, 0), (1, 2), None]


def test_nan_loss_stops_the_stage_naming_the_step(ray_cluster, setup):
    make, storage = setup
    _, job = make("train.num_workers=1", "lr.align=1e30", pipeline="ia2")[:2]
    with pytest.raises(NonFiniteLossError, match=r"stage align: (dev )?loss is (nan|inf) at step \d+"):
        fit(job, "nan", str(storage))


def test_out_of_memory_in_a_worker_names_the_batch(ray_cluster, setup):
    """A real allocator failure inside a Train worker (a 300k-token query makes a 90 GB attention mask)."""
    from ia2ray.core.stages import StageOutOfMemoryError
    from ia2ray.train.worker import ItemRef

    make, storage = setup
    _, job = make("train.num_workers=1", "train.batch_size=2", pipeline="sft")[:2]
    huge = [ItemRef([5] * 300_000, [6]), ItemRef([5] * 10, [6])]
    job = replace(job, stages=[replace(job.stages[0], train=huge)])
    with pytest.raises(StageOutOfMemoryError, match=r"stage sft: out of memory at step 1 with a micro-batch of 2 "
                       r"on each of 1 worker\(s\) \(1 accumulation steps; train.batch_size=2\)"):
        fit(job, "oom", str(storage))


CLI_FAST = ["train.max_epochs=2", "data.val_size=8", "data.test_size=8", "eval.icl_draws=2", "data.n=4",
            "pipeline=ia2->sft"]


def test_run_cli_trains_on_ray_workers_and_a_rerun_resumes_the_finished_run(ray_cluster, tmp_path):
    from ia2ray.run import main

    sets = [a for s in CLI_FAST for a in ("--set", s)]
    args = [*sets, "--set", "train.num_workers=1", "--set", f"output.dir={tmp_path}/out",
            "--set", f"capture.cache_dir={tmp_path}/c"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert [s["name"] for s in first["stages"]] == ["align", "sft"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    # the final checkpoint comes after the evaluation, with the adapter; the driver loaded no weights
    assert (tmp_path / "out" / "train" / "default" / "ckpt-2-eval-end" / "adapter" / "adapter_model.safetensors").is_file()
    assert first["driver_model_loads"] == 0 and first["model_loads"] == 1
    assert first["eval_node"] == first["workers"]["node_id"] == first["stages"][0]["placement"]["node_id"]
    assert set(first["icl"]) == {"val", "test"} and json.loads((tmp_path / "out" / "answers.json").read_text()).keys() \
        == {"val", "test", "icl/val", "icl/test"}
    # the same name again: the run is complete, so its final checkpoint is the result (no training)
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["stages"] == first["stages"] and second["test"] == first["test"]


def test_run_cli_rejects_a_bad_deepspeed_file_before_starting(tmp_path, capsys):
    from ia2ray.run import main

    assert main(["--set", "train.num_workers=2", "--set", f"train.deepspeed={tmp_path}/nope.json",
                 "--set", f"output.dir={tmp_path}/out"]) == 2
    assert "train.deepspeed=" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_cli_two_workers_zero3_in_a_fresh_process(tmp_path):
    """The issue's command line, in its own process with its own local Ray cluster."""
    import subprocess
    import sys

    sets = [a for s in CLI_FAST for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "ia2ray.run", *sets, "--set", "train.num_workers=2",
                          "--set", "train.zero_stage=3", "--set", f"output.dir={tmp_path}/out",
                          "--json", str(tmp_path / "s.json")], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["align", "sft"] and 0 <= summary["test"]["acc"] <= 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_bf16_on_cpu_trains_with_a_user_deepspeed_file_read_by_the_driver(ray_cluster, setup, tmp_path, monkeypatch):
    make, storage = setup
    monkeypatch.chdir(tmp_path)
    Path("mine.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    _, job = make("train.num_workers=1", "train.precision=bf16", "train.deepspeed=mine.json", pipeline="ia2")[:2]
    assert job.deepspeed == {"zero_optimization": {"stage": 1}}
    Path("mine.json").unlink()  # a relative path means nothing in a worker: the job carries the contents
    out = fit(job, "bf16", str(storage))
    losses = _train_losses(out.finished)
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    # the checkpointed adapter is DeepSpeed's fp32 master copy, not the bf16 weights the forward used
    assert any((v - v.bfloat16().float()).abs().max() > 0 for k, v in out.adapter.items() if "lora_B" in k)


def test_workers_evaluate_where_they_trained_as_the_process_would(ray_cluster, setup, tmp_path, zero3_json):
    """`run_with_ray`, `ia2->sft` on 2 ZeRO-3 workers (the model loaded once and partitioned by the first
    stage's engine, the second stage's engine built on it): the ranks split the evaluation rows (ICL
    baseline and activation similarity included) with the parameters gathered, and give the adapter and
    metrics of the same run in one process; the driver loads no weights; the summary says where evaluation ran."""
    from ia2ray.core.pipeline import run_pipeline
    from ia2ray.train.ray_stages import run_with_ray

    make, storage = setup
    sets = ("eval.icl_baseline=true", "eval.icl_draws=2", "data.test_size=9", f"train.storage={storage}",
            "name=evaluated", "train.num_workers=2", f"train.deepspeed={zero3_json}", "train.max_epochs=2")
    cfg = make(*sets)[0]
    remote = run_pipeline(cfg, runner=run_with_ray, progress=False)
    local = run_pipeline(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 0})}),
                         progress=False)
    for key in ("val", "test"):
        for metric in ("acc", "ece", "nll", "brier"):
            assert remote.summary[key][metric] == pytest.approx(local.summary[key][metric], abs=1e-5), (key, metric)
            assert remote.summary["icl"][key][metric] == pytest.approx(local.summary["icl"][key][metric], abs=1e-5)
        assert [r["correct"] for r in remote.answers[key]] == [r["correct"] for r in local.answers[key]]
    assert remote.summary["test"]["n"] == 9  # an odd count: rank 0 scores 5 rows, rank 1 scores 4
    # activation similarity: measured by the ranks on their shares of the rows, as the process measures it
    assert remote.summary["sim"]["rows"] == local.summary["sim"]["rows"] > 1
    assert remote.summary["sim"]["layers"] == pytest.approx(local.summary["sim"]["layers"], abs=1e-4)
    assert remote.summary["timings"]["sim_s"] > 0
    assert remote.summary["driver_model_loads"] == 0 and remote.summary["model_loads"] == 1
    assert remote.summary["eval_node"] == remote.summary["workers"]["node_id"]
    assert remote.summary["workers"]["world_size"] == 2 and remote.summary["workers"]["eval_s"] > 0
    adapter = tmp_path / "adapter"
    remote.save_adapter(adapter)
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    local_state = {k.replace(".default", ""): v for k, v in local.model.state_dict().items() if "lora_" in k}
    assert saved.keys() == local_state.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], local_state[k], atol=1e-5, rtol=0)
