"""The paper's 12 benchmarks as registered tasks: prompts string for string from small local files with
the hub's real column names and label sets (never a download), the row transforms, the held-out eval
pools, the out-of-domain pairs, and loader errors that name the file, the line and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ia2ray.data import DataError, build_icl_prompt, format_demo, format_query, get_parser, get_task, load_file
from ia2ray.data.benchmarks import OOD_PAIRS, PAPER_TASKS
from ia2ray.data.splits import load_pools

SCIQ = {"question": "What part of the cell makes energy?", "correct_answer": "mitochondria",
        "distractor1": "nucleus", "distractor2": "ribosome", "distractor3": "membrane",
        "support": "Mitochondria release energy."}
QASC = {"question": "What do plants need to grow?", "answerKey": "C", "choices": {
    "text": ["sand", "noise", "sunlight", "plastic", "ice", "wind", "salt", "metal"],
    "label": ["A", "B", "C", "D", "E", "F", "G", "H"]}}
GSM = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "She has 2 + 3 = <<2+3=5>>5.\n#### 5"}
MATH = {"problem": "Solve $2x = 1$.", "solution": "So $x = \\boxed{\\dfrac{1}{2}}$.", "level": "Level 1",
        "type": "Algebra"}
BBC_LONG = ("word " * 70).strip()  # 349 characters

# task -> (rows in the hub's columns, expected demos of the rows the task keeps)
CASES = {
    "sst2": ([{"idx": 0, "sentence": "a gripping film ", "label": 1}, {"idx": 1, "sentence": "dull", "label": 0}],
             ["Text:a gripping film \nLabel:1", "Text:dull\nLabel:0"]),
    "fins": ([{"sentence": "Profit rose.", "label": 2}, {"sentence": "Sales held.", "label": 1},
              {"sentence": "Loss widened.", "label": 0}],
             ["Text:Profit rose.\nLabel:1", "Text:Loss widened.\nLabel:0"]),
    "poems": ([{"id": 0, "verse_text": "with pensive joy", "label": 1}, {"id": 1, "verse_text": "the road", "label": 2},
               {"id": 2, "verse_text": "sad and grey", "label": 0}, {"id": 3, "verse_text": "bittersweet", "label": 3}],
              ["Text:with pensive joy\nLabel:1", "Text:sad and grey\nLabel:0"]),
    "strategyqa": ([{"qid": "a", "term": "Cat", "question": "Can a cat fly?", "answer": False, "facts": []},
                    {"qid": "b", "term": "Sun", "question": "Is the sun hot?", "answer": True, "facts": []}],
                   ["Question:Can a cat fly?\nAnswer:0", "Question:Is the sun hot?\nAnswer:1"]),
    "agnews": ([{"text": "Stocks fall on Wall St.", "label": 2}, {"text": "New chip unveiled", "label": 3}],
               ["Text:Stocks fall on Wall St.\nLabel:2", "Text:New chip unveiled\nLabel:3"]),
    "bbcnews": ([{"text": "ad sales boost profits", "label": 1, "label_text": "business"},
                 {"text": BBC_LONG, "label": 4, "label_text": "politics"},
                 {"text": "gadget show opens", "label": 0, "label_text": "tech"}],
                ["Text:ad sales boost profits\nLabel:2", "Text:" + ("word " * 51).strip() + "\nLabel:0",
                 "Text:gadget show opens\nLabel:3"]),
    "sciq-remap": ([SCIQ], ["Question:What part of the cell makes energy?\nChoices:\n[apple]nucleus\n[Friday]ribosome\n"
                            "[banana]mitochondria\n[Saturday]membrane\n\nAnswer:banana"]),
    "qasc-remap": ([QASC], ["Question:What do plants need to grow?\nChoices:\n[apple]sand\n[Friday]noise\n"
                            "[banana]sunlight\n[Saturday]plastic\n[Thursday]ice\n[Sunday]wind\n[Wednesday]salt\n"
                            "[Monday]metal\n\nAnswer:banana"]),
    "gsm8k": ([GSM], ["Question:Ann has 2 apples and buys 3. How many?\nAnswer:She has 2 + 3 = <<2+3=5>>5.\n#### 5"]),
    "gsm-symbolic": ([{**GSM, "id": 1, "instance": 0}],
                     ["Question:Ann has 2 apples and buys 3. How many?\nAnswer:She has 2 + 3 = <<2+3=5>>5.\n#### 5"]),
    "math-algebra": ([MATH], ["Question:Solve $2x = 1$.\nAnswer:So $x = \\boxed{\\dfrac{1}{2}}$."]),
    "sciq": ([SCIQ], ["Question:What part of the cell makes energy?\nAnswer:Mitochondria release energy.\n"
                      "#### mitochondria"]),
}
GOLD = {"gsm8k": "5", "gsm-symbolic": "5", "math-algebra": "\\frac{1}{2}", "sciq": "mitochondria"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_paper_task_is_registered_with_its_hub_source():
    assert sorted(PAPER_TASKS) == sorted(CASES)
    for name in PAPER_TASKS:
        spec = get_task(name)
        assert spec.hub_id and spec.train_pool == 2000 and spec.eval_pool == 500
        assert spec.answer_template == "{answer}"  # the answer follows the colon directly
    assert [get_task(n).hub_config for n in ("fins", "gsm8k", "gsm-symbolic", "math-algebra")] == \
        ["sentences_50agree", "main", "main", "algebra"]
    assert [get_task(n).max_new_tokens for n in ("gsm8k", "math-algebra", "sciq", "sst2")] == [200, 400, 200, 1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompts_match_the_paper_string_for_string(name, tmp_path):
    rows, demos = CASES[name]
    spec = get_task(name)
    examples = load_file(spec, write_jsonl(tmp_path / f"{name}.jsonl", rows))
    assert [format_demo(spec, ex) for ex in examples] == demos
    assert all(demo.startswith(format_query(spec, ex)) for demo, ex in zip(demos, examples))
    if name in GOLD:
        assert get_parser(spec.parser)(examples[0].answer) == GOLD[name]


def test_bbc_cut_on_a_space_and_labels_from_csv(tmp_path):
    from ia2ray.data.transforms import bbc_to_agnews

    exact = "a" * 255 + " tail words"  # character 256 is the space: the cut keeps 255 characters, drops ""
    assert bbc_to_agnews({"text": exact, "label": 0})["text"] == "a" * 255
    assert bbc_to_agnews({"text": "short text", "label": "3"}) == {"text": "short text", "label": 0}
    with pytest.raises(ValueError, match=r"unknown label \[1\]"):
        bbc_to_agnews({"text": "x", "label": [1]})
    strategy = tmp_path / "s.csv"
    strategy.write_text("qid,question,answer\na,Is ice cold?,True\nb,Can fish fly?,False\n")
    assert [e.answer for e in load_file(get_task("strategyqa"), strategy)] == ["1", "0"]
    fins = tmp_path / "f.csv"
    fins.write_text("sentence,label\nUp.,2\nFlat.,1\nDown.,0\n")
    assert [(e.fields["sentence"], e.answer) for e in load_file(get_task("fins"), fins)] == [("Up.", "1"),
                                                                                             ("Down.", "0")]


def test_icl_prompt_joins_demos_with_blank_lines(tmp_path):
    spec = get_task("sst2")
    rows = [{"sentence": s, "label": y} for s, y in [("good", 1), ("bad", 0), ("fine", 1)]]
    a, b, query = load_file(spec, write_jsonl(tmp_path / "s.jsonl", rows))
    assert build_icl_prompt(spec, [a, b], query) == "Text:good\nLabel:1\n\nText:bad\nLabel:0\n\nText:fine\nLabel:"


def test_sciq_options_are_shuffled_per_example_not_per_file(tmp_path):
    spec = get_task("sciq-remap")
    rows = [{**SCIQ, "question": f"Question {i}?", "correct_answer": f"right {i}"} for i in range(40)]
    forward = load_file(spec, write_jsonl(tmp_path / "a.jsonl", rows))
    backward = load_file(spec, write_jsonl(tmp_path / "b.jsonl", rows[::-1]))
    assert [format_demo(spec, e) for e in forward] == [format_demo(spec, e) for e in backward][::-1]
    assert {e.answer for e in forward} == {"apple", "Friday", "banana", "Saturday"}  # every position is used
    for i, ex in enumerate(forward):
        lines = ex.fields["choices"].splitlines()
        assert sorted(line.split("]", 1)[1] for line in lines) == sorted([f"right {i}", "nucleus", "ribosome",
                                                                          "membrane"])
        assert f"[{ex.answer}]right {i}" in lines


@pytest.mark.parametrize("name, row, expected", [
    ("sst2", {"sentence": "ok", "label": 5}, "unknown label '5' (expected one of '0', '1')"),
    ("fins", {"sentence": "ok", "label": 3}, "unknown label '3' (expected one of '0', '2')"),
    ("strategyqa", {"question": "q?", "answer": "maybe"}, "unknown label 'maybe' (expected one of 'False', 'True')"),
    ("bbcnews", {"text": "x", "label": 7}, "unknown label 7 (expected 0 tech, 1 business, 2 sport, 3 entertainment"),
    ("qasc-remap", {**QASC, "answerKey": "Z"}, "answerKey 'Z' is not one of the choice labels"),
    ("sciq-remap", {**SCIQ, "distractor2": ""}, "column 'distractor2' must be non-empty text"),
])
def test_unknown_labels_and_bad_rows_name_the_file_and_line(name, row, expected, tmp_path):
    spec = get_task(name)
    rows, _ = CASES[name]
    path = write_jsonl(tmp_path / "d.jsonl", [rows[0], row])
    with pytest.raises(DataError) as err:
        load_file(spec, path)
    assert f"{path}:2: {expected}" in str(err.value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_file_without_a_required_column_is_refused_naming_it(name, tmp_path):
    spec = get_task(name)
    rows, _ = CASES[name]
    column = _required(name)[0]
    path = write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if k != column} for r in rows])
    with pytest.raises(DataError) as err:
        load_file(spec, path)
    assert f"{path}:1: missing column '{column}'" in str(err.value)


def _required(name: str) -> list[str]:
    from ia2ray.data.transforms import TRANSFORMS

    spec = get_task(name)
    return list(TRANSFORMS[spec.transform].columns) if spec.transform else [*spec.input_fields, spec.label_field]


def test_a_single_split_dataset_holds_out_its_last_rows_as_the_eval_pool(tmp_path):
    spec = get_task("fins").model_copy(update={"eval_holdout": 5})
    rows = [{"sentence": f"s{i}", "label": [0, 1, 2][i % 3]} for i in range(30)]  # 20 kept, 10 neutral dropped
    path = write_jsonl(tmp_path / "fins.jsonl", rows)
    train, evals = load_pools(spec, 2000, 500, path)
    assert len(train) == 15 and len(evals) == 5
    assert not {e.source for e in train} & {e.source for e in evals}
    assert load_pools(spec, 2000, 500, path) == (train, evals)  # seeded
    assert get_task("fins").eval_holdout == get_task("strategyqa").eval_holdout == 500
    with pytest.raises(ValueError, match=f"{path} has 20 usable rows, but the eval pool alone takes the last 500"):
        load_pools(get_task("fins"), 2000, 500, path)


def test_ood_pairs_share_the_label_words_of_their_source():
    assert OOD_PAIRS == {"sst2": ["sst2", "fins", "poems"], "fins": ["fins", "poems", "sst2"],
                         "agnews": ["agnews", "bbcnews"], "sciq-remap": ["sciq-remap", "qasc-remap"],
                         "gsm8k": ["gsm8k", "gsm-symbolic"]}
    for source, targets in OOD_PAIRS.items():
        words = set((get_task(source).label_words or {}).values())
        for target in targets:
            spec = get_task(target)
            assert spec.answer_type == get_task(source).answer_type
            assert words <= set((spec.label_words or {}).values())  # qasc-remap adds four more words


def test_ood_icl_prompt_has_source_demos_and_the_target_query(tmp_path):
    sst2, fins = get_task("sst2"), get_task("fins")
    demo = load_file(sst2, write_jsonl(tmp_path / "s.jsonl", [{"sentence": "good", "label": 1}]))[0]
    query = load_file(fins, write_jsonl(tmp_path / "f.jsonl", [{"sentence": "Profit rose.", "label": 2}]))[0]
    assert build_icl_prompt(fins, [demo], query, demo_spec=sst2) == "Text:good\nLabel:1\n\nText:Profit rose.\nLabel:"


WORDS = ["good", "bad", "fine", "dull", "great", "poor", "warm", "cold"]


def _pair_rows(task: str, n: int) -> list[dict]:
    """n rows in the hub columns of `task` (the tasks of the paper's OOD pairs)."""
    w = lambda i: WORDS[i % 8]  # noqa: E731
    return {"sst2": lambda: [{"idx": i, "sentence": f"{w(i)} {w(i * 3)} film", "label": i % 2} for i in range(n)],
            "fins": lambda: [{"sentence": f"Sales {w(i)}.", "label": i % 3} for i in range(n)],  # neutral dropped
            "poems": lambda: [{"id": i, "verse_text": f"a {w(i)} night", "label": i % 4} for i in range(n)],
            "agnews": lambda: [{"text": f"{w(i)} news {w(i * 3)}", "label": i % 4} for i in range(n)],
            "bbcnews": lambda: [{"text": f"{w(i)} story", "label": i % 5} for i in range(n)],
            "sciq-remap": lambda: [{**SCIQ, "question": f"Which {w(i)} part {i}?", "correct_answer": w(i + 1)}
                                   for i in range(n)],
            "qasc-remap": lambda: [{**QASC, "question": f"What is {w(i)} {i}?", "answerKey": "ABCDEFGH"[i % 8]}
                                   for i in range(n)],
            "gsm8k": lambda: [{"question": f"{i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                              for i in range(n)],
            "gsm-symbolic": lambda: [{"question": f"{i} plus 2?", "answer": f"#### {i + 2}", "id": i, "instance": 0}
                                     for i in range(n)]}[task]()


def pair_files(source: str, tmp_path) -> dict:
    """Train and eval files of `source` and one eval file per OOD target of the paper, in hub columns."""
    rows = _pair_rows(source, 90)
    return {"train": write_jsonl(tmp_path / f"{source}-train.jsonl", rows[:60]),
            "eval": write_jsonl(tmp_path / f"{source}-eval.jsonl", rows[60:]),
            "ood": {t: write_jsonl(tmp_path / f"{t}.jsonl", _pair_rows(t, 40)) for t in OOD_PAIRS[source][1:]}}


@pytest.fixture(scope="module")
def testbed_with_remap_words(tmp_path_factory) -> str:
    """The testbed model with the paper's eight MCQ label words added to its vocabulary as whole tokens
    (new embedding rows drawn around the old ones, transformers' default). The testbed tokenizer never
    saw those words and cuts them into pieces; Qwen3 and Llama-3 keep each as one token after "Answer:"
    (docs/config.md, "Tasks and the paper's benchmarks")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ia2ray.data.transforms import REMAP_WORDS
    from ia2ray.testbed import testbed_model_path

    tokenizer = AutoTokenizer.from_pretrained(testbed_model_path())
    assert tokenizer.add_tokens(list(REMAP_WORDS)) == 8
    model = AutoModelForCausalLM.from_pretrained(testbed_model_path())
    model.resize_token_embeddings(len(tokenizer))
    out = tmp_path_factory.mktemp("testbed-remap")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


PAIR_STUDY = """\
name: pair
pipeline: ia2->sft
model: {{path: "{model}"}}
task: {{name: {source}, path: {train}, eval_path: {eval}, ood: {ood}}}
data: {{n: 4, val_size: 8, test_size: 8, train_pool: 40, eval_pool: 20}}
train: {{max_epochs: 1, num_workers: 0}}
eval: {{icl_draws: 1, max_new_tokens: 8}}
study: {{num_trials: 1, search_seeds: [0], confirm: {{top_k: 1, seeds: [0], baselines: [icl]}}}}
search:
  params:
    lr.align: {{kind: loguniform, low: 1.0e-4, high: 1.0e-2, default: 1.0e-3}}
"""


def write_pair_study(tmp_path, source: str, model: str = "builtin:testbed") -> Path:
    """pair.yaml: a one-trial smoke study of `source` with every OOD target of the paper, from local files."""
    files = pair_files(source, tmp_path)
    ood = "{" + ", ".join(f"{t}: {path}" for t, path in files["ood"].items()) + "}"
    path = tmp_path / "pair.yaml"
    path.write_text(PAIR_STUDY.format(model=model, source=source, train=files["train"], eval=files["eval"], ood=ood))
    return path


@pytest.mark.parametrize("ood, expected", [
    ({"nope": None}, "task.ood.nope: unknown task 'nope'"),
    ({"gsm8k": None}, "task.ood.gsm8k: a text task cannot be an out-of-domain target of 'sst2', a label task"),
    ({"poems": "SMALL"}, "task.ood.poems: no usable rows in"),
])
def test_bad_ood_targets_are_refused_before_anything_runs(ood, expected, tmp_path, capsys):
    from ia2ray.tune import main

    path = write_pair_study(tmp_path, "sst2")
    small = write_jsonl(tmp_path / "small.jsonl", [{"verse_text": "x", "label": 2}, {"verse_text": "y", "label": 3}])
    flow = "{" + ", ".join(f"{k}: {small if v == 'SMALL' else 'null'}" for k, v in ood.items()) + "}"
    assert main(["--config", str(path), "--storage", str(tmp_path / "studies"), "--set", f"task.ood={flow}",
                 "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


def test_ood_pairs_run_in_a_smoke_study_on_the_testbed_model(ray_cluster, mlflow_server, tmp_path, capsys):
    """SST2 -> FinS and PoemS from local files: the confirmation runs score every target (ICL with SST2
    demos before target queries), the search never does, and the report and MLflow carry them."""
    import csv

    import mlflow

    from ia2ray.tune import main

    path = write_pair_study(tmp_path, "sst2")
    storage = tmp_path / "studies"
    assert main(["--config", str(path), "--storage", str(storage), "--tracking-uri", mlflow_server]) == 0, \
        capsys.readouterr().err[-3000:]
    study = storage / "pair"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in study.glob("runs/*/summary.json")}
    assert sorted(summaries) == ["confirm-ICL-s0", "confirm-best-1-s0", next(n for n in summaries if "trial" in n)]
    for name, summary in summaries.items():
        if name.startswith("confirm"):
            assert summary["ood/fins"]["n"] == summary["ood/poems"]["n"] == 8 and "ece" in summary["ood/fins"]
        else:  # selection never sees a target
            assert not [k for k in summary if k.startswith("ood/")]
    assert summaries["confirm-ICL-s0"]["ood/fins"]["draws"] == 1  # the ICL baseline, with SST2 demos
    report = (study / "report.md").read_text()
    assert "## Out of domain" in report and "| method | seeds | fins acc |" in report and "poems ECE" in report
    header = next(csv.reader((study / "report.csv").open()))
    assert {"ood/fins_acc_mean", "ood/poems_ece_std"} <= set(header)
    client = mlflow.MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "pair"]
    runs = client.search_runs([experiment.experiment_id])
    confirm = [r for r in runs if r.data.tags.get("ia2ray.phase") == "confirm"]
    search = [r for r in runs if r.data.tags.get("ia2ray.phase") == "search"]
    assert len(confirm) == 2 and len(search) == 1
    assert all({"ood/fins/acc", "ood/poems/acc", "test/acc"} <= set(r.data.metrics) for r in confirm)
    assert not [k for k in search[0].data.metrics if k.startswith("ood/")]


def test_paper_scale_studies_cover_the_training_tasks_with_their_ood_targets():
    from ia2ray.config import load_study_file

    root = Path(__file__).resolve().parents[1] / "search_spaces"
    trained = [t for t in PAPER_TASKS if t not in ("poems", "bbcnews", "qasc-remap", "gsm-symbolic")]
    for prefix, n in (("qwen3-4b", 4), ("llama-3.2-1b", 8)):
        for task in trained:
            base, _ = load_study_file(root / f"{prefix}-{task}.yaml")  # a study file is a run config too
            assert (base.name, base.task.name, base.data.n) == (f"{prefix}-{task}", task, n)
            assert list(base.task.ood) == OOD_PAIRS.get(task, [task])[1:]  # targets from the hub (null paths)
            assert all(target.path is None for target in base.task.ood.values())


def test_label_words_the_tokenizer_cuts_are_refused_before_anything_runs(tmp_path, capsys):
    """SciQ-remap -> QASC-remap on the plain testbed model: "apple" is two tokens after "Answer:", so the
    dry run stops with the task, the OOD target and the word named, and nothing is written."""
    from ia2ray.tune import main

    path = write_pair_study(tmp_path, "sciq-remap")
    assert main(["--config", str(path), "--storage", str(tmp_path / "studies"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "task.name: task sciq-remap: label word 'apple' is 2 tokens after the prompt" in err
    assert "task.ood.qasc-remap: task qasc-remap: label word 'apple' is 2 tokens" in err
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize("source", ["fins", "agnews", "sciq-remap", "gsm8k"])
def test_the_other_ood_pairs_run_in_a_smoke_study(source, ray_cluster, testbed_with_remap_words, tmp_path, capsys):
    """Every other train task of the paper's OOD pairs (SST2 is the test above), from local files on the
    testbed model: FinS -> PoemS and SST2, AGNews -> BBCNews, SciQ-remap -> QASC-remap (eight label
    words, four of them unseen in training), GSM8K -> GSM-Symbolic (generated answers, parsed)."""
    from ia2ray.tune import main

    targets = OOD_PAIRS[source][1:]
    path = write_pair_study(tmp_path, source, testbed_with_remap_words if source == "sciq-remap" else "builtin:testbed")
    storage = tmp_path / "studies"
    assert main(["--config", str(path), "--storage", str(storage), "--tracking-uri", "none"]) == 0, \
        capsys.readouterr().err[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in (storage / "pair").glob("runs/*/summary.json")}
    confirm = {n: s for n, s in summaries.items() if n.startswith("confirm")}
    assert sorted(confirm) == ["confirm-ICL-s0", "confirm-best-1-s0"] and len(summaries) == 3
    label_task = get_task(source).answer_type == "label"
    for name, summary in summaries.items():
        found = sorted(k for k in summary if k.startswith("ood/"))
        if name not in confirm:
            assert found == []  # the search never sees a target
            continue
        assert found == [f"ood/{t}" for t in sorted(targets)]
        for target in targets:
            scores = summary[f"ood/{target}"]
            assert scores["n"] == 8 and 0.0 <= scores["acc"] <= 1.0
            assert (scores.get("ece") is not None) == label_task  # generated answers: accuracy only
    assert confirm["confirm-ICL-s0"][f"ood/{targets[0]}"]["draws"] == 1
    report = (storage / "pair" / "report.md").read_text()
    assert "## Out of domain" in report and all(f"{t} acc" in report for t in targets)


@pytest.mark.parametrize("source", sorted(OOD_PAIRS))
def test_a_single_run_scores_its_ood_targets(source, testbed_with_remap_words, tmp_path, capsys):
    """`python -m ia2ray.run` on the testbed model from local files, for every train task of the pairs."""
    from ia2ray.run import main

    files = pair_files(source, tmp_path)
    train, evals = files["train"], files["eval"]
    target, ood = next(iter(files["ood"].items()))
    model = testbed_with_remap_words if source == "sciq-remap" else "builtin:testbed"
    out = tmp_path / "summary.json"
    sets = [f"model.path={model}", f"task.name={source}", f"task.path={train}", f"task.eval_path={evals}",
            f"task.ood={{{target}: {ood}}}", "data.n=4", "data.val_size=8", "data.test_size=8", "data.train_pool=40",
            "data.eval_pool=20", "train.max_epochs=1", "train.num_workers=0", "eval.icl_draws=1",
            "eval.max_new_tokens=8", f"output.dir={tmp_path / 'out'}"]
    assert main([a for s in sets for a in ("--set", s)] + ["--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary[f"ood/{target}"]["n"] == summary["icl"][f"ood/{target}"]["n"] == 8
    assert 0.0 <= summary[f"ood/{target}"]["acc"] <= 1.0
    printed = capsys.readouterr().out
    assert printed.count(f"ood/{target}") == 2  # the ICL row and the trained model's
