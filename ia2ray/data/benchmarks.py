"""The IA2 paper's 12 benchmarks as registered tasks (facts from the paper and its reference code).

Classification tasks prompt ``Text:{text}\\nLabel:`` (or ``Question:...\\nAnswer:``) and answer with a
digit label that follows the colon directly; the MCQ tasks (SciQ-remap, QASC-remap) list their options
as ``[word]option`` lines and answer with the option's remapped word (``REMAP_WORDS``); the generative
tasks (GSM8K, GSM-Symbolic, MATH-Algebra, SciQ) answer with a full solution, stop at a blank line and
are scored by their parser. Pools: 2000 train / 500 eval rows after a seeded shuffle; datasets with one
usable split hold out their last 500 rows as the eval pool (`eval_holdout`).

Out-of-domain pairs of the paper (train task -> eval tasks; demos from the train task):
``OOD_PAIRS``. PoemS and BBCNews are evaluation targets only in the paper.
"""

from __future__ import annotations

from ia2ray.data.tasks import DIGIT_ANSWER, TaskSpec, register_task
from ia2ray.data.transforms import REMAP_WORDS

TEXT = "Text:{text}\nLabel:"
QUESTION = "Question:{question}\nAnswer:"
MCQ = "Question:{question}\nChoices:\n{choices}\nAnswer:"
DIRECT = DIGIT_ANSWER  # every benchmark's answer follows "Label:" / "Answer:" directly, as in the paper


def _label(name: str, template: str, field: str, n_labels: int, **kw) -> TaskSpec:
    words = kw.pop("label_words", None) or {str(i): str(i) for i in range(n_labels)}
    return register_task(TaskSpec(name=name, template=template, input_fields=kw.pop("input_fields", [field]),
                                  label_field=kw.pop("label_field", "label"), label_words=words,
                                  answer_template=DIRECT, answer_type="label", **kw))


def _generative(name: str, field: str, answer_field: str, parser: str, max_new_tokens: int, **kw) -> TaskSpec:
    return register_task(TaskSpec(name=name, template=QUESTION.replace("{question}", "{" + field + "}"),
                                  input_fields=[field], label_field=answer_field, answer_template=DIRECT,
                                  answer_type="text", parser=parser, max_new_tokens=max_new_tokens,
                                  stop_strings=["\n\n"], **kw))


_label("sst2", TEXT.replace("{text}", "{sentence}"), "sentence", 2, hub_id="stanfordnlp/sst2",
       eval_split="validation")  # the hub's test split has no labels (-1)
_label("fins", TEXT.replace("{text}", "{sentence}"), "sentence", 2, label_words={"0": "0", "2": "1"}, drop_labels=["1"],
       hub_id="takala/financial_phrasebank", hub_config="sentences_50agree", eval_holdout=500)  # neutral dropped
_label("poems", TEXT.replace("{text}", "{verse_text}"), "verse_text", 2, drop_labels=["2", "3"],  # no_impact, mixed
       hub_id="google-research-datasets/poem_sentiment", train_split="validation", eval_split="train")
_label("strategyqa", QUESTION, "question", 2, label_field="answer", label_words={"False": "0", "True": "1"},
       hub_id="wics/strategy-qa", train_split="test", eval_holdout=500)
_label("agnews", TEXT, "text", 4, hub_id="fancyzhx/ag_news")  # 0 World, 1 Sports, 2 Business, 3 Sci/Tech
_label("bbcnews", TEXT, "text", 4, transform="bbc_to_agnews", hub_id="SetFit/bbc-news")
_label("sciq-remap", MCQ, "question", 4, input_fields=["question", "choices"],
       label_words={str(i): w for i, w in enumerate(REMAP_WORDS[:4])}, transform="sciq_remap",
       hub_id="allenai/sciq", eval_split="validation")
_label("qasc-remap", MCQ, "question", 8, input_fields=["question", "choices"],
       label_words={str(i): w for i, w in enumerate(REMAP_WORDS)}, transform="qasc_remap",
       hub_id="allenai/qasc", eval_split="validation")
_generative("gsm8k", "question", "answer", "number", 200, hub_id="openai/gsm8k", hub_config="main")
_generative("gsm-symbolic", "question", "answer", "number", 200, hub_id="apple/GSM-Symbolic", hub_config="main",
            train_split="test", eval_holdout=500)
_generative("math-algebra", "problem", "solution", "boxed", 400, hub_id="EleutherAI/hendrycks_math",
            hub_config="algebra")
_generative("sciq", "question", "answer", "after_hashes", 200, transform="sciq_generative", hub_id="allenai/sciq",
            eval_split="validation")

# train task -> the tasks the paper evaluates it on (the first is in-domain)
OOD_PAIRS: dict[str, list[str]] = {
    "sst2": ["sst2", "fins", "poems"],
    "fins": ["fins", "poems", "sst2"],
    "agnews": ["agnews", "bbcnews"],
    "sciq-remap": ["sciq-remap", "qasc-remap"],
    "gsm8k": ["gsm8k", "gsm-symbolic"],
}
PAPER_TASKS = ["sst2", "fins", "poems", "strategyqa", "agnews", "bbcnews", "sciq-remap", "qasc-remap", "gsm8k",
               "gsm-symbolic", "math-algebra", "sciq"]
