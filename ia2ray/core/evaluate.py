"""Evaluation: single-token label scoring (accuracy, confidence, ECE, NLL, Brier), multi-token greedy
decoding with answer parsing, and the ICL baseline (base model with N-1 demos, averaged over draws).

Confidence of a single-token prediction, as in the paper: `top10` = the top-1 probability renormalised
over the top-10 tokens, correct when the top-1 token equals the label word; `label_set` = softmax over
the label words' tokens only, argmax among them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ia2ray.config.schema import EvalConfig
from ia2ray.core.generate import encode_prompts, greedy_generate, ids_in_context, left_pad
from ia2ray.core.metrics import classification_metrics
from ia2ray.data.examples import Example, build_icl_prompt, format_query
from ia2ray.data.parsers import PARSERS
from ia2ray.data.tasks import TaskSpec


def label_token_ids(tokenizer, spec: TaskSpec, query: str) -> dict[str, int]:
    """Label word -> the single token it is right after `query` (any query of the task: they all
    end with the template's tail). Error when a label word is not exactly one token there, or when it
    merges with the end of the prompt in a demonstration (``:banana`` as one piece): the query would
    then be scored on a token the demonstrations never show."""
    out = {}
    for word in dict.fromkeys(spec.label_words.values()):
        answer = spec.answer_template.format(answer=word)
        ids = ids_in_context(tokenizer, query, answer)
        if ids is None:
            tail = query[-12:] + answer
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(tail, add_special_tokens=False)["input_ids"])
            raise ValueError(
                f"task {spec.name}: label word {word!r} merges with the end of the prompt for this tokenizer "
                f"({tail!r} -> {pieces}), so demonstrations show other tokens than the one the query is "
                "scored on; use label words or a template that keep the word apart"
            )
        if len(ids) != 1:
            raise ValueError(
                f"task {spec.name}: label word {word!r} is {len(ids)} tokens after the prompt for this "
                f"tokenizer ({tokenizer.convert_ids_to_tokens(ids)}); single-token evaluation needs exactly one"
            )
        out[word] = ids[0]
    return out


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    """Logits [n, V] (float32, CPU) of the token after each prompt, batched with left padding."""
    model.eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        ids = encode_prompts(tokenizer, prompts[start : start + batch_size])
        input_ids, mask, positions = (t.to(device) for t in left_pad(ids, tokenizer.pad_token_id))
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        rows.append(out.logits[:, -1].float().cpu())
    return torch.cat(rows)


def score_labels(logits: torch.Tensor, golds: Sequence[str], tokenizer, label_ids: dict[str, int], confidence: str):
    """Per example: (correct, confidence, probability of the gold label token)."""
    if confidence == "label_set":
        words = list(label_ids)
        probs = torch.softmax(logits[:, [label_ids[w] for w in words]], dim=-1)
        conf, pred = probs.max(dim=-1)
        correct = [words[p] == g for p, g in zip(pred.tolist(), golds)]
        gold_p = [probs[i, words.index(g)].item() for i, g in enumerate(golds)]
        return correct, conf.tolist(), gold_p
    if confidence != "top10":
        raise ValueError(f"unknown confidence {confidence!r}; expected top10 or label_set")
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(min(10, probs.shape[-1]), dim=-1)
    conf = top.values[:, 0] / top.values.sum(-1)
    pred_ids = top.indices[:, 0].tolist()
    correct = [p == label_ids[g] or tokenizer.decode([p]).strip() == g for p, g in zip(pred_ids, golds)]
    gold_p = [probs[i, label_ids[g]].item() for i, g in enumerate(golds)]
    return correct, conf.tolist(), gold_p


def prompts_for(spec: TaskSpec, examples: Sequence[Example], demos: Optional[Sequence[Example]] = None,
                demo_spec: Optional[TaskSpec] = None) -> list[str]:
    """Zero-shot queries, or ICL prompts with the same demos before every query (formatted by
    `demo_spec` when they come from another task)."""
    if demos:
        return [build_icl_prompt(spec, list(demos), ex, demo_spec) for ex in examples]
    return [format_query(spec, ex) for ex in examples]


def parse_answer(spec: TaskSpec, text: str) -> Optional[str]:
    """The task's parser applied to a generation cut at the first stop string."""
    for stop in spec.stop_strings:
        text = text.split(stop)[0]
    return PARSERS[spec.parser](text)


def score_rows(model, tokenizer, spec: TaskSpec, examples: Sequence[Example], cfg: EvalConfig, device,
               demos: Optional[Sequence[Example]] = None, demo_spec: Optional[TaskSpec] = None) -> list[dict]:
    """Each example scored on its own (zero-shot, or with `demos` of task `demo_spec` in the prompt):
    label tasks `{"pred", "correct", "conf", "gold_p"}` (pred: the top token, or the top label word
    with `label_set` confidence), free-text tasks `{"pred", "correct", "text"}` (pred: the parsed
    answer, text: the decoded generation)."""
    if not examples:
        return []
    prompts = prompts_for(spec, examples, demos, demo_spec)
    if spec.answer_type == "label":
        logits = next_token_logits(model, tokenizer, prompts, cfg.batch_size, device)
        golds = [ex.answer for ex in examples]
        label_ids = label_token_ids(tokenizer, spec, format_query(spec, examples[0]))
        correct, conf, gold_p = score_labels(logits, golds, tokenizer, label_ids, cfg.confidence)
        if cfg.confidence == "label_set":
            words = list(label_ids)
            preds = [words[i] for i in logits[:, [label_ids[w] for w in words]].argmax(-1).tolist()]
        else:
            preds = [tokenizer.decode([i]) for i in logits.argmax(-1).tolist()]
        return [{"pred": p, "correct": bool(c), "conf": float(f), "gold_p": float(g)}
                for p, c, f, g in zip(preds, correct, conf, gold_p)]
    budget = cfg.max_new_tokens or spec.max_new_tokens
    generated = greedy_generate(model, tokenizer, prompts, budget, stop_strings=spec.stop_strings,
                                batch_size=cfg.batch_size)
    out = []
    for gen, ex in zip(generated, examples):
        text = tokenizer.decode(gen.token_ids.tolist(), skip_special_tokens=True)
        pred = parse_answer(spec, text)
        gold = PARSERS[spec.parser](ex.answer)
        out.append({"pred": pred, "correct": pred is not None and pred == (gold if gold is not None else ex.answer.strip()),
                    "text": text})
    return out


def rows_metrics(spec: TaskSpec, scored: Sequence[dict], cfg: EvalConfig) -> dict:
    """The metrics of scored rows (`score_rows`): accuracy, and for label tasks confidence-based ECE
    (with its reliability bins), NLL and Brier."""
    if spec.answer_type == "label":
        metrics = classification_metrics([r["conf"] for r in scored], [r["correct"] for r in scored],
                                         [r["gold_p"] for r in scored], n_bins=cfg.ece_bins, scheme=cfg.ece_scheme)
        metrics["confidence"] = cfg.confidence
        return metrics
    return {"acc": sum(r["correct"] for r in scored) / len(scored), "n": len(scored), "ece": None}


def evaluate(model, tokenizer, spec: TaskSpec, examples: Sequence[Example], cfg: EvalConfig, device,
             demos: Optional[Sequence[Example]] = None, demo_spec: Optional[TaskSpec] = None) -> dict:
    """Metrics of `model` on `examples` (zero-shot, or with `demos` of task `demo_spec` in the prompt)."""
    return rows_metrics(spec, score_rows(model, tokenizer, spec, examples, cfg, device, demos, demo_spec), cfg)


def icl_summary(runs: Sequence[dict]) -> dict:
    """The ICL baseline's metrics: the mean over its demo draws (and each draw's accuracy); for label
    tasks also every draw's reliability bins, one list (for the pooled reliability diagram)."""
    out = {"draws": len(runs), "n": runs[0]["n"]}
    for key in ("acc", "ece", "nll", "brier"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    out["per_draw_acc"] = [r["acc"] for r in runs]
    if any(r.get("reliability") for r in runs):
        out["reliability"] = [b for r in runs for b in r.get("reliability") or []]
    return out


def icl_baseline(model, tokenizer, spec: TaskSpec, examples: Sequence[Example],
                 draws: Sequence[Sequence[Example]], cfg: EvalConfig, device,
                 demo_spec: Optional[TaskSpec] = None) -> dict:
    """The base model with N-1 demos (from outside the training set), averaged over demo draws."""
    return icl_summary([evaluate(model, tokenizer, spec, examples, cfg, device, demos=d, demo_spec=demo_spec)
                        for d in draws])
