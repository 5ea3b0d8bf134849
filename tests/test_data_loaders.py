"""Loaders: local jsonl/csv/parquet, hub (monkeypatched), generators; every bad row reported at once."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ia2ray.data import DataError, Example, TaskSpec, get_task, load_examples
from ia2ray.data.loaders import MAX_LISTED_PROBLEMS


@pytest.fixture
def spec() -> TaskSpec:
    return TaskSpec(
        name="t",
        template="Text:{text}\nLabel:",
        input_fields=["text"],
        label_field="label",
        label_words={"0": "negative", "1": "positive"},
        answer_type="label",
    )


@pytest.fixture
def text_spec() -> TaskSpec:
    return TaskSpec(
        name="qa", template="Question:{q}\nAnswer:", input_fields=["q"], label_field="a", answer_type="text"
    )


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def problems_of(info) -> list[str]:
    return info.value.problems


# --- jsonl ---------------------------------------------------------------------------------------


def test_jsonl_good(tmp_path, spec):
    path = write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"text": "great", "label": 1, "extra": "ignored"}),
            "",  # blank lines are skipped but still counted
            json.dumps({"text": "awful", "label": "0"}),
            json.dumps({"text": "fine", "label": 1.0}),
        ],
    )
    assert load_examples(spec, path) == [
        Example(fields={"text": "great"}, answer="positive", source=f"{path}:1"),
        Example(fields={"text": "awful"}, answer="negative", source=f"{path}:3"),
        Example(fields={"text": "fine"}, answer="positive", source=f"{path}:4"),
    ]


def test_jsonl_all_problems_at_once(tmp_path, spec):
    path = write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"text": "ok", "label": 1}),
            '{"text": "broken", "label": ',
            json.dumps({"text": "no label"}),
            json.dumps({"text": "   ", "label": 0}),
            json.dumps({"text": "bad label", "label": 7}),
            json.dumps(["not", "an", "object"]),
            json.dumps({"text": 5, "label": None}),
            json.dumps({"text": "ok too", "label": "1"}),
        ],
    )
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [
        f"{path}:2: malformed JSON: Expecting value (column 29)",
        f"{path}:3: missing column 'label'",
        f"{path}:4: empty value in column 'text'",
        f"{path}:5: unknown label '7' (expected one of '0', '1')",
        f"{path}:6: expected a JSON object, got list",
        f"{path}:7: column 'text' must be text, got int 5",
        f"{path}:7: missing value in column 'label'",
    ]
    message = str(info.value)
    assert message.startswith(f"7 problem(s) in {path}:\n")
    assert f"{path}:5: unknown label '7' (expected one of '0', '1')" in message
    assert isinstance(info.value, ValueError)


def test_jsonl_with_bom_and_crlf(tmp_path, spec):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\r\n{"text": "b", "label": 0}\r\n')
    assert [(e.fields["text"], e.answer) for e in load_examples(spec, path)] == [("a", "positive"), ("b", "negative")]


def test_jsonl_column_missing_everywhere_reported_once(tmp_path, spec):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": f"t{i}"}) for i in range(30)])
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [f"{path}:1: missing column 'label' (no row has it; columns found: text)"]


def test_problem_list_is_capped(tmp_path, spec):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": "x", "label": 9})] * 25)
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    message = str(info.value)
    assert len(problems_of(info)) == 25
    assert f"{path}:20: unknown label '9'" in message and f"{path}:21:" not in message
    assert message.splitlines()[-1] == f"  ... and {25 - MAX_LISTED_PROBLEMS} more"


def test_free_text_answers(tmp_path, text_spec):
    good = [json.dumps({"q": "2+2?", "a": 4}), json.dumps({"q": "name?", "a": " Ada "})]
    assert [e.answer for e in load_examples(text_spec, write_lines(tmp_path / "qa.jsonl", good))] == ["4", "Ada"]
    path = write_lines(tmp_path / "bad.jsonl", good + [json.dumps({"q": "x", "a": ""})])
    with pytest.raises(DataError) as info:
        load_examples(text_spec, path)
    assert problems_of(info) == [f"{path}:3: empty value in column 'a'"]


# --- csv -----------------------------------------------------------------------------------------


def test_csv_good_with_multiline_field(tmp_path, spec):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"two\nlines",1\nplain,0\n\nlast,1\n', encoding="utf-8")
    assert load_examples(spec, path) == [
        Example(fields={"text": "two\nlines"}, answer="positive", source=f"{path}:2"),
        Example(fields={"text": "plain"}, answer="negative", source=f"{path}:4"),
        Example(fields={"text": "last"}, answer="positive", source=f"{path}:6"),
    ]


def test_csv_bad_rows(tmp_path, spec):
    path = tmp_path / "data.csv"
    path.write_text('text,label\ngood,1\n,0\n"multi\nline",7\nshort\nok,1,extra\nfine,0\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [
        f"{path}:3: empty value in column 'text'",
        f"{path}:4: unknown label '7' (expected one of '0', '1')",
        f"{path}:6: 1 fields but the header has 2",
        f"{path}:7: 3 fields but the header has 2",
    ]


def test_csv_missing_column_in_header(tmp_path, spec):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello,1\nbye,0\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [f"{path}:1: missing column 'text' (no row has it; columns found: label, sentence)"]


# --- parquet -------------------------------------------------------------------------------------


def test_parquet_good_and_bad(tmp_path, spec):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["great", None, "meh", "awful"], "label": [1, 0, 3, 0]}), path)
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [
        f"{path}:row 1: missing value in column 'text'",
        f"{path}:row 2: unknown label '3' (expected one of '0', '1')",
    ]
    pq.write_table(pa.table({"text": ["great", "awful"], "label": [1, 0]}), path)
    assert load_examples(spec, path) == [
        Example(fields={"text": "great"}, answer="positive", source=f"{path}:row 0"),
        Example(fields={"text": "awful"}, answer="negative", source=f"{path}:row 1"),
    ]


def test_parquet_missing_column(tmp_path, spec):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    with pytest.raises(DataError) as info:
        load_examples(spec, path)
    assert problems_of(info) == [f"{path}: missing column 'label' (no row has it; columns found: text)"]


def test_unreadable_parquet(tmp_path, spec):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet file"):
        load_examples(spec, path)


# --- file-level errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path, spec):
    with pytest.raises(DataError, match=f"data file not found: {tmp_path / 'nope.jsonl'}"):
        load_examples(spec, tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path, spec):
    path = write_lines(tmp_path / "data.txt", ["hello"])
    with pytest.raises(DataError, match=r"unsupported file extension '\.txt' \(expected \.jsonl, \.csv or \.parquet\)"):
        load_examples(spec, path)


@pytest.mark.parametrize("name, content", [("empty.jsonl", "\n\n"), ("empty.csv", "text,label\n")])
def test_empty_files(tmp_path, spec, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="no data rows"):
        load_examples(spec, path)


def test_no_data_source(spec):
    with pytest.raises(DataError, match="has no data source"):
        load_examples(spec)


# --- hub -----------------------------------------------------------------------------------------


def test_hub_loading(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        data = [{"idx": 0, "sentence": "a gem ", "label": 1}, {"idx": 1, "sentence": "dull", "label": 0}]
        return datasets.Dataset.from_list(data)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_examples(get_task("sst2"), split="eval")
    assert calls == [("stanfordnlp/sst2", None, "validation")]
    assert rows == [
        Example(fields={"sentence": "a gem "}, answer="1", source="stanfordnlp/sst2[validation]:row 0"),
        Example(fields={"sentence": "dull"}, answer="0", source="stanfordnlp/sst2[validation]:row 1"),
    ]
    load_examples(get_task("sst2"), split="train")
    assert calls[-1] == ("stanfordnlp/sst2", None, "train")


def test_hub_bad_rows_and_failure(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"sentence": "x", "label": -1}])
    with pytest.raises(DataError) as info:
        load_examples(get_task("sst2"), split="test")
    assert problems_of(info) == ["stanfordnlp/sst2[test]:row 0: unknown label '-1' (expected one of '0', '1')"]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'stanfordnlp/sst2' .*split 'train'.*no network"):
        load_examples(get_task("sst2"))


# --- generators ----------------------------------------------------------------------------------


def test_generated_sizes_and_determinism():
    spec = get_task("toy/polarity").model_copy(update={"train_pool": 40, "eval_pool": 10})
    train = load_examples(spec, split="train", seed=0)
    assert len(train) == 40 and len(load_examples(spec, split="eval")) == 10
    assert train == load_examples(spec, split="train", seed=0)
    assert [e.fields for e in train] != [e.fields for e in load_examples(spec, split="train", seed=1)]
    assert train[0].source == "generator:polarity[train, seed 0]:row 0"
    assert {e.answer for e in train} == {"0", "1"}


def test_generated_train_and_eval_streams_differ():
    spec = get_task("toy/reverse").model_copy(update={"train_pool": 50, "eval_pool": 50})
    train = [e.fields["text"] for e in load_examples(spec, split="train")]
    evals = [e.fields["text"] for e in load_examples(spec, split="eval")]
    assert train != evals
    assert len(set(train) & set(evals)) < 5  # 17576 possible rows: overlaps are rare
