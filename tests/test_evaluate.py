"""Evaluation: exact single-token scoring, batched == unbatched logits, free-text decoding + parsing."""

from __future__ import annotations

import math

import pytest
import torch

from ia2ray.config.schema import EvalConfig
from ia2ray.core.evaluate import (evaluate, icl_baseline, label_token_ids, next_token_logits, parse_answer,
                                  score_labels)
from ia2ray.core.generate import greedy_generate
from ia2ray.core.items import answer_ids
from ia2ray.core.tiny import default_corpus, tiny_model, train_bpe_tokenizer, train_metaspace_tokenizer
from ia2ray.data.examples import Example, build_icl_prompt, format_query
from ia2ray.data.tasks import TaskSpec, get_task


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(default_corpus())


@pytest.fixture(scope="module")
def gpt2(tok):  # absolute positions: wrong padding would change the logits
    return tiny_model("gpt2", tok, hidden_size=32, num_layers=2, initializer_range=0.2)


def test_label_token_ids_and_multi_token_label_error(tok):
    spec = get_task("toy/polarity")
    ids = label_token_ids(tok, spec, "Text:good\nLabel:")
    assert set(ids) == {"0", "1"} and all(tok.decode([i]) == w for w, i in ids.items())
    bad = spec.model_copy(update={"name": "bad", "label_words": {"0": "0", "1": "xqzvkwj"}})
    with pytest.raises(ValueError, match=r"label word 'xqzvkwj' is \d+ tokens"):
        label_token_ids(tok, bad, "Text:good\nLabel:")



def test_a_label_word_that_merges_with_the_prompt_is_refused():
    """A byte-level tokenizer that learned ":banana" as one piece: demonstrations would show that piece,
    while the query ("...Answer:") is scored on the word's own token, so label_token_ids refuses it."""
    spec = get_task("sciq-remap")
    words = list(spec.label_words.values())
    merging = train_bpe_tokenizer([" ".join(f"Answer:{w} {w}" for w in words)] * 50, vocab_size=400)
    assert merging.convert_ids_to_tokens(merging("Answer:banana")["input_ids"]) == ["Answer", ":banana"]
    query = "Question:Which?\nChoices:\n[apple]x\n\nAnswer:"
    with pytest.raises(ValueError, match=r"label word 'apple' merges with the end of the prompt .*':apple'\]"):
        label_token_ids(merging, spec, query)
    # the same words kept apart from the colon (as the Qwen3 and Llama-3 vocabularies do) are accepted
    apart = train_bpe_tokenizer(["\n".join(f"Answer:\n{w}" for w in words)] * 50, vocab_size=400)
    assert apart.convert_ids_to_tokens(apart("Answer:banana")["input_ids"])[-2:] == [":", "banana"]
    assert [apart.decode([i]) for i in label_token_ids(apart, spec, query).values()] == words

def test_top10_and_label_set_scores_are_exact(tok):
    ids = label_token_ids(tok, get_task("toy/polarity"), "Text:good\nLabel:")
    v = len(tok)
    logits = torch.zeros(2, v)
    logits[0, ids["1"]] = 5.0  # predicts "1", gold "1"
    logits[1, ids["1"]] = 1.0  # predicts "1", gold "0"
    logits[1, ids["0"]] = 0.5
    correct, conf, gold_p = score_labels(logits, ["1", "0"], tok, ids, "top10")
    assert correct == [True, False]
    e5, e1, e05 = math.exp(5), math.e, math.exp(0.5)
    assert conf[0] == pytest.approx(e5 / (e5 + 9))
    assert conf[1] == pytest.approx(e1 / (e1 + e05 + 8))
    assert gold_p[0] == pytest.approx(e5 / (e5 + v - 1))
    assert gold_p[1] == pytest.approx(e05 / (e1 + e05 + v - 2))
    correct, conf, gold_p = score_labels(logits, ["1", "0"], tok, ids, "label_set")
    assert correct == [True, False]
    assert conf[0] == pytest.approx(e5 / (e5 + 1)) and conf[1] == pytest.approx(e1 / (e1 + e05))
    assert gold_p[1] == pytest.approx(e05 / (e1 + e05))
    with pytest.raises(ValueError, match="unknown confidence"):
        score_labels(logits, ["1", "0"], tok, ids, "top5")


def test_batched_left_padded_logits_equal_one_at_a_time(tok, gpt2):
    prompts = ["Text: good\nLabel:", "Text: a much longer sentence about bad sad things\nLabel:", "x"]
    batched = next_token_logits(gpt2, tok, prompts, batch_size=3, device="cpu")
    single = torch.cat([next_token_logits(gpt2, tok, [p], batch_size=1, device="cpu") for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_evaluate_label_task_matches_manual_scoring(tok, gpt2):
    spec = get_task("toy/polarity")
    exs = [Example({"text": t}, a, f"t:{i}") for i, (t, a) in enumerate([("good", "1"), ("bad", "0"), ("fine", "1")])]
    cfg = EvalConfig(batch_size=2, ece_bins=3)
    m = evaluate(gpt2, tok, spec, exs, cfg, "cpu")
    logits = next_token_logits(gpt2, tok, [format_query(spec, e) for e in exs], 8, "cpu")
    correct, conf, gold_p = score_labels(logits, [e.answer for e in exs], tok, label_token_ids(tok, spec, "Text:x\nLabel:"), "top10")
    assert m["n"] == 3 and m["acc"] == pytest.approx(sum(correct) / 3)
    assert m["nll"] == pytest.approx(-sum(math.log(p) for p in gold_p) / 3, rel=1e-6)
    assert m["ece_scheme"] == "equal_mass" and m["confidence"] == "top10"
    # the ICL baseline is the mean over draws of evaluating with demos
    draws = [[exs[0]], [exs[1]]]
    base = icl_baseline(gpt2, tok, spec, exs, draws, cfg, "cpu")
    per = [evaluate(gpt2, tok, spec, exs, cfg, "cpu", demos=d) for d in draws]
    assert base["acc"] == pytest.approx(sum(p["acc"] for p in per) / 2)
    assert base["ece"] == pytest.approx(sum(p["ece"] for p in per) / 2)
    assert build_icl_prompt(spec, draws[0], exs[1]) == "Text:good\nLabel:1\n\nText:bad\nLabel:"


def test_free_text_evaluation_parses_and_compares(tok, gpt2):
    spec = TaskSpec(name="t/echo", template="Q:{q}\nA:", input_fields=["q"], label_field="a", answer_type="text",
                    max_new_tokens=5, stop_strings=["\n\n"])
    queries = ["abc", "hello there", "x y"]
    outs = greedy_generate(gpt2, tok, [f"Q:{q}\nA:" for q in queries], 5, stop_strings=["\n\n"])
    own = [parse_answer(spec, tok.decode(o.token_ids.tolist(), skip_special_tokens=True)) for o in outs]
    right = [Example({"q": q}, o or "", f"r:{i}") for i, (q, o) in enumerate(zip(queries, own))]
    wrong = [Example({"q": q}, "definitely not this", f"w:{i}") for i, q in enumerate(queries)]
    cfg = EvalConfig(batch_size=2)
    expected = sum(o is not None for o in own) / 3
    assert evaluate(gpt2, tok, spec, right, cfg, "cpu")["acc"] == pytest.approx(expected)
    assert evaluate(gpt2, tok, spec, wrong, cfg, "cpu") == {"acc": 0.0, "n": 3, "ece": None}


def test_parse_answer_cuts_at_the_stop_string():
    spec = TaskSpec(name="t/p", template="{q}", input_fields=["q"], label_field="a", answer_type="text",
                    parser="number", stop_strings=["\n\n"])
    assert parse_answer(spec, " so 12 apples.\n\nQuestion: 99") == "12"
    assert parse_answer(spec, " no digits\n\n42") is None


@pytest.fixture(scope="module")
def sp_tok():
    return train_metaspace_tokenizer(default_corpus())


def test_answers_are_tokenized_as_they_follow_the_query(sp_tok):
    """SentencePiece-style tokenizers (BOS, prepended "▁") tokenize an answer differently alone."""
    spec = get_task("toy/polarity")
    ex = Example({"text": "good fun"}, "1", "x")
    query = format_query(spec, ex)
    alone = sp_tok("1", add_special_tokens=False)["input_ids"]
    joint = sp_tok(query + "1")["input_ids"]
    in_context = joint[len(sp_tok(query)["input_ids"]):]
    assert alone != in_context  # the trap: "▁" + "1" on its own, "1" after "Label:"
    assert answer_ids(sp_tok, spec, ex) == in_context == [label_token_ids(sp_tok, spec, query)["1"]]
    rev = get_task("toy/reverse")
    ex2 = Example({"text": "a b c"}, "c b a", "y")
    q2 = format_query(rev, ex2)
    assert answer_ids(sp_tok, rev, ex2) == sp_tok(q2 + " c b a")["input_ids"][len(sp_tok(q2)["input_ids"]):] + [
        sp_tok.eos_token_id]


def test_label_evaluation_with_a_bos_adding_tokenizer(sp_tok):
    model = tiny_model("llama", sp_tok, hidden_size=32, num_layers=2, initializer_range=0.2)
    spec = get_task("toy/polarity")
    exs = [Example({"text": t}, a, f"t:{i}") for i, (t, a) in enumerate([("good", "1"), ("bad", "0")])]
    m = evaluate(model, sp_tok, spec, exs, EvalConfig(), "cpu")
    logits = next_token_logits(model, sp_tok, [format_query(spec, e) for e in exs], 8, "cpu")
    ids = label_token_ids(sp_tok, spec, format_query(spec, exs[0]))
    expected = [logits[i].argmax().item() == ids[e.answer] for i, e in enumerate(exs)]
    assert m["acc"] == pytest.approx(sum(expected) / 2)
