"""The hub loading path (`datasets.load_dataset`) on a local dataset folder: no download."""

from __future__ import annotations

import json

import pytest

from ia2ray.data.loaders import DataError, load_examples
from ia2ray.data.tasks import get_task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sst2_spec_loads_through_load_dataset_from_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "sst2"
    repo.mkdir()
    _write(repo / "train.jsonl", [{"idx": i, "sentence": f"s{i}", "label": i % 2} for i in range(6)])
    _write(repo / "validation.jsonl", [{"idx": 0, "sentence": "v0", "label": 1}])
    spec = get_task("sst2").model_copy(update={"hub_id": str(repo)})
    train = load_examples(spec, split="train")
    assert [e.fields["sentence"] for e in train] == [f"s{i}" for i in range(6)]
    assert [e.answer for e in train] == ["0", "1"] * 3
    assert train[0].source.startswith(str(repo))
    val = load_examples(spec, split="eval")
    assert [(e.fields["sentence"], e.answer) for e in val] == [("v0", "1")]


def test_hub_rows_with_unknown_labels_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "bad"
    repo.mkdir()
    _write(repo / "train.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": -1}])
    spec = get_task("sst2").model_copy(update={"hub_id": str(repo)})
    with pytest.raises(DataError, match=r"row 1: unknown label '-1'"):
        load_examples(spec, split="train")


def test_transformed_and_held_out_tasks_load_through_load_dataset(tmp_path, monkeypatch):
    """QASC's nested `choices` column survives the hub path, and a single-split dataset (StrategyQA,
    booleans) is split into train and held-out eval pools from the same hub split."""
    from ia2ray.data.splits import load_pools

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    qasc = tmp_path / "qasc"
    qasc.mkdir()
    row = {"id": "q0", "question": "What grows?", "answerKey": "B", "fact1": "f", "fact2": "g",
           "choices": {"text": ["rock", "plant", "glass", "iron", "salt", "sand", "ice", "tin"],
                       "label": list("ABCDEFGH")}}
    _write(qasc / "train.jsonl", [row])
    _write(qasc / "validation.jsonl", [row])
    spec = get_task("qasc-remap").model_copy(update={"hub_id": str(qasc)})
    (ex,) = load_examples(spec, split="train")
    assert ex.answer == "Friday" and ex.fields["choices"].startswith("[apple]rock\n[Friday]plant\n")
    strategy = tmp_path / "strategy"
    strategy.mkdir()
    _write(strategy / "test.jsonl", [{"qid": str(i), "question": f"q{i}?", "answer": i % 3 == 0} for i in range(12)])
    spec = get_task("strategyqa").model_copy(update={"hub_id": str(strategy), "eval_holdout": 4})
    train, evals = load_pools(spec, 2000, 500)
    assert len(train) == 8 and len(evals) == 4 and not {e.source for e in train} & {e.source for e in evals}
    from ia2ray.data.splits import eval_pool

    assert eval_pool(spec, 500) == evals  # an OOD target from the hub: the same held-out rows
    assert {e.answer for e in train + evals} == {"0", "1"}


def test_a_script_dataset_is_read_from_the_hubs_parquet_export(tmp_path, monkeypatch):
    """datasets >= 4 refuses repositories that still hold a loading script (financial_phrasebank was one);
    the loader then asks for the same config and split at revision refs/convert/parquet, the hub's
    parquet copy. The real refusal comes from a local folder with a script; the export revision, which
    only the hub serves, is answered from a local parquet folder laid out as the hub lays it out."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ia2ray.data.loaders import PARQUET_EXPORT

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "financial_phrasebank"
    repo.mkdir()
    (repo / "financial_phrasebank.py").write_text("import datasets\n")
    export = tmp_path / "export"
    (export / "sentences_50agree" / "train").mkdir(parents=True)
    rows = [{"sentence": f"s{i}", "label": i % 3} for i in range(9)]
    pq.write_table(pa.Table.from_pylist(rows), export / "sentences_50agree" / "train" / "0000.parquet")
    real = datasets.load_dataset
    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if revision == PARQUET_EXPORT:
            return real("parquet", data_files=str(export / name / split / "*.parquet"), split=split)
        return real(path, name, split=split)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = get_task("fins").model_copy(update={"hub_id": str(repo), "eval_holdout": 2})
    train = load_examples(spec, split="train")
    assert calls == [(str(repo), "sentences_50agree", "train", None),
                     (str(repo), "sentences_50agree", "train", PARQUET_EXPORT)]
    assert [(e.fields["sentence"], e.answer) for e in train] == [("s0", "0"), ("s2", "1"), ("s3", "0"), ("s5", "1"),
                                                                ("s6", "0"), ("s8", "1")]  # neutral (1) dropped
    export.joinpath("sentences_50agree", "train", "0000.parquet").unlink()  # the export is missing too
    with pytest.raises(DataError, match=r"cannot load hub dataset .*financial_phrasebank.* its loading script "
                                        r"refused, then revision 'refs/convert/parquet'"):
        load_examples(spec, split="train")
