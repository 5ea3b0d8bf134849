"""Tasks shaped in the config: format overrides of a registered task and whole new tasks, checked before
anything loads, with errors that name the key."""

from __future__ import annotations

import json

import pytest

from ia2ray.config import ConfigError, load_run_config
from ia2ray.config.schema import TASK_FORMAT_KEYS
from ia2ray.core.preflight import preflight
from ia2ray.core.rundata import prepare_data
from ia2ray.data import build_icl_prompt, format_demo, format_query, get_task, load_file
from ia2ray.data.loaders import without_stops
from ia2ray.data.tasks import FORMAT_KEYS, resolve_task

ROWS = [{"idx": i, "sentence": s, "label": y} for i, (s, y) in enumerate(
    [("a gripping film", 1), ("dull and long", 0), ("warm and funny", 1), ("a mess", 0)] * 20)]
REVIEW = {"template": "Review: {sentence}\nSentiment:", "answer_template": " {answer}",
          "label_words": {0: "negative", 1: "positive"}}


@pytest.fixture
def sst2_file(tmp_path):
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def test_config_and_data_agree_on_the_format_keys():
    assert TASK_FORMAT_KEYS == FORMAT_KEYS


def test_overrides_change_the_prompt_string_for_string(sst2_file):
    spec = resolve_task("sst2", REVIEW)
    assert spec.label_words == {"0": "negative", "1": "positive"} and spec.hub_id == "stanfordnlp/sst2"
    rows = load_file(spec, sst2_file)
    assert format_query(spec, rows[0]) == "Review: a gripping film\nSentiment:"
    assert format_demo(spec, rows[1]) == "Review: dull and long\nSentiment: negative"
    assert build_icl_prompt(spec, rows[1:3], rows[0]) == (
        "Review: dull and long\nSentiment: negative\n\nReview: warm and funny\nSentiment: positive\n\n"
        "Review: a gripping film\nSentiment:")
    assert resolve_task("sst2", {}) is get_task("sst2")  # no overrides: the registered spec itself


def test_new_label_words_replace_the_dropped_set():
    """FinS drops neutral (1); labelling all three classes keeps neutral rows."""
    spec = resolve_task("fins", {"label_words": {"0": "negative", "1": "neutral", "2": "positive"}})
    assert spec.drop_labels == []
    assert resolve_task("fins", {"label_words": {"0": "bad", "2": "good"}}).drop_labels == ["1"]


def test_a_new_task_declared_in_the_yaml(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"body": f"text {i}", "stars": i % 2}) + "\n" for i in range(40)))
    cfg = load_run_config(None, ["task.name=my/reviews", f"task.path={path}", "data.n=4", "data.val_size=4",
                                 "data.test_size=8", "data.train_pool=30", "data.eval_pool=10",
                                 'task.define={template: "Body:{body}\\nStars:", input_fields: [body], '
                                 'label_field: stars, answer_type: label, label_words: {0: "0", 1: "1"}, '
                                 'eval_holdout: 10}'])
    data = prepare_data(cfg)
    assert data.spec.name == "my/reviews" and data.spec.eval_holdout == 10
    assert format_query(data.spec, data.splits.test[0]).startswith("Body:text ")
    assert len(data.splits.train) == 4 and len(data.splits.test) == 8


@pytest.mark.parametrize("overrides, message", [
    (['task.template="Review: {text}\\nSentiment:"'], "task: task 'sst2': template placeholders {text} are not in input_fields"),
    (["task.label_words={0: good, 1: good}"], "task: task 'sst2': label_words must be distinct"),
    (["task.name=sst9"], "task.name: unknown task 'sst9'"),
    (["task.define={template: 'x{a}', input_fields: [a], label_field: y, answer_type: label}"],
     "task.define: 'sst2' is a registered task"),
    (["task.name=new/t", "task.define={template: 'x{a}', input_fields: [a], label_field: y}"],
     "task.define: answer_type: Field required"),
])
def test_bad_task_shapes_are_refused_naming_the_key(overrides, message, sst2_file):
    cfg = load_run_config(None, ["task.name=sst2", f"task.path={sst2_file}", f"task.eval_path={sst2_file}", *overrides])
    with pytest.raises(ValueError) as exc:
        prepare_data(cfg)
    assert message in str(exc.value)


def test_label_words_that_are_not_one_token_are_refused_before_training(sst2_file):
    """The testbed's vocabulary has no 'negative' token: preflight names task.label_words."""
    cfg = load_run_config(None, ["task.name=sst2", f"task.path={sst2_file}", f"task.eval_path={sst2_file}", "data.n=4", "data.val_size=4",
                                 "data.test_size=4", 'task.template="Review: {sentence}\\nSentiment:"',
                                 'task.answer_template=" {answer}"', "task.label_words={0: negative, 1: positive}"])
    with pytest.raises(ConfigError) as exc:
        preflight(cfg, prepare_data(cfg))
    assert "task.label_words" in str(exc.value) and "negative" in str(exc.value)


def test_blank_lines_in_generated_gold_answers_are_collapsed():
    gsm = get_task("gsm8k")
    assert without_stops(gsm, "Step 1.\n\n\nStep 2.\n\n#### 5") == "Step 1.\nStep 2.\n#### 5"
    assert without_stops(resolve_task("gsm8k", {"stop_strings": ["###"]}), "a\n\nb") == "a\n\nb"


FINS = [{"sentence": s, "label": y} for s, y in
        [("Sales rose 9%.", 2), ("The plant closed.", 0), ("The meeting is on Monday.", 1)] * 10]


@pytest.fixture
def fins_file(tmp_path):
    path = tmp_path / "fins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FINS))
    return str(path)


def test_an_ood_target_takes_its_own_format_keys(sst2_file, fins_file):
    """SST-2 -> FinS in the Review format: the target's label words follow the source's, neutral stays dropped."""
    review = ['task.template="Review: {sentence}\\nSentiment:"', 'task.answer_template=" {answer}"',
              "task.label_words={0: negative, 1: positive}"]
    target = (f'{{fins: {{path: {fins_file}, template: "Review: {{sentence}}\\nSentiment:", '
              'answer_template: " {answer}", label_words: {0: negative, 2: positive}}}')
    base = ["task.name=sst2", f"task.path={sst2_file}", f"task.eval_path={sst2_file}", "data.n=4", "data.val_size=4",
            "data.test_size=8"]
    spec, rows = prepare_data(load_run_config(None, [*base, *review, f"task.ood={target}"])).ood["fins"]
    assert spec.label_words == {"0": "negative", "2": "positive"} and spec.drop_labels == ["1"]
    assert len(rows) == 8 and {r.answer for r in rows} == {"negative", "positive"}
    negative = next(r for r in rows if r.answer == "negative")  # the eval pool is drawn in a seeded order
    assert format_query(spec, negative) == "Review: The plant closed.\nSentiment:"
    assert format_demo(spec, negative) == "Review: The plant closed.\nSentiment: negative"
    plain = prepare_data(load_run_config(None, [*base, f"task.ood={{fins: {fins_file}}}"])).ood["fins"]
    assert plain[0] is get_task("fins")  # a target given by its path alone keeps the registered spec


def test_ood_targets_dump_as_they_were_written(fins_file):
    """A target without format keys is written back as its path (null: the hub); `--set` can add keys to a null one."""
    cfg = load_run_config(None, ["task.name=sst2", f"task.ood={{fins: {fins_file}, poems: null}}"])
    assert cfg.model_dump(mode="json")["task"]["ood"] == {"fins": fins_file, "poems": None}
    cfg = load_run_config(None, ["task.name=sst2", "task.ood={fins: null}", "task.ood.fins.label_words={0: bad, 2: good}"])
    assert cfg.task.ood["fins"].path is None
    assert cfg.model_dump(mode="json")["task"]["ood"] == {"fins": {"path": None, "label_words": {"0": "bad", "2": "good"}}}
    assert type(cfg).model_validate(cfg.model_dump(mode="json")) == cfg  # what a trial receives


@pytest.mark.parametrize("target, message", [
    ("{fins: {path: FILE, template: 'Text: {text}'}}", "task.ood.fins: task 'fins': template placeholders {text}"),
    ("{fins: {path: FILE, label_words: {0: a, 1: a, 2: b}}}", "task.ood.fins: task 'fins': label_words must be distinct"),
    ("{fins: {path: FILE, templat: x}}", "task.ood.fins.templat: unknown key"),
])
def test_bad_ood_formats_are_refused_naming_the_target(target, message, sst2_file, fins_file):
    sets = ["task.name=sst2", f"task.path={sst2_file}", f"task.eval_path={sst2_file}",
            "task.ood=" + target.replace("FILE", fins_file)]
    with pytest.raises(ValueError) as exc:  # ConfigError (load) and ValueError (prepare) alike
        prepare_data(load_run_config(None, sets))
    assert message in str(exc.value)
