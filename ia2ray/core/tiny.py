"""Tiny random models and tokenizers for tests, benchmarks and the built-in testbed.

Everything here is built locally (no hub access): a byte-level BPE tokenizer trained with the
`tokenizers` library, and random-init causal LMs of five shapes (Llama, Qwen2, Qwen3, Mistral,
GPT-2) small enough to run on a CPU in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
EOS_TOKEN = "<|endoftext|>"
_BUILD_MARKER = "ia2ray_tiny.json"  # written last into the temp dir: its presence = complete build
# GPT-4/Qwen2-style split: single digits, letters with one leading non-letter, newline runs.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_WORDS = (
    "the a movie film story plot actor music song poem book great good bad awful boring fun "
    "happy sad love hate sun rain tree river stone cat dog bird fish horse apple banana bread "
    "market stock price profit loss bank team game match goal win lose world news science "
    "space cell energy water plant animal red blue green small large fast slow old new very not"
).split()
_LABELS = (
    "positive negative neutral yes no sports business world science apple banana Monday "
    "Tuesday Wednesday Thursday Friday Saturday Sunday 0 1 2 3 4 5 6 7 8 9"
).split()


def default_corpus(n_examples: int = 400, seed: int = 0) -> list[str]:
    """A small deterministic corpus shaped like the project's prompts.

    Blocks of "Text: <words>\\nLabel: <word>" demos joined by blank lines, a few
    "Question: ...\\nAnswer: ..." items, and digits, letters and punctuation, so typical test
    prompts tokenize into few tokens.
    """
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n_examples // 4):
        demos = []
        for _ in range(4):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
            demos.append(f"Text: {words}\nLabel: {rng.choice(_LABELS)}")
        texts.append("\n\n".join(demos))
    for _ in range(n_examples // 8):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        texts.append(f"Question: what is {a} plus {b}?\nAnswer: {a + b}\n\n#### {a + b}")
    texts += [
        "0 1 2 3 4 5 6 7 8 9 0123456789 10 100 1000",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z abcdefghijklmnopqrstuvwxyz",
        "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
        ". , ; : ! ? ' \" ( ) [ ] { } - + = * / \\ # $ % & @ _ < > | ~ ` ^",
        " \n \n\n\t  \n\n\n",
    ]
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer on `texts`.

    Every byte is in the alphabet, so any NFC-normalized string (whitespace and newlines
    included) round-trips through encode/decode. The only special token is EOS "<|endoftext|>"
    (id 0), also used as pad. No BOS is added.
    """
    tok = Tokenizer(models.BPE())
    # Qwen2's normalizer + pre-tokenizer: transformers' AutoTokenizer rebuilds a qwen2 checkpoint's
    # tokenizer with exactly these, so every tiny arch reloads to the tokenizer it was saved with.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def train_metaspace_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral-style tokenizer: SentencePiece-like Metaspace BPE ("▁" marks a space, one
    is prepended to the text), digits split, BOS "<s>" added to every encoding, EOS "</s>".

    Unlike the byte-level tokenizer, a word tokenizes differently at the start of a string than
    after other text, so it exposes query/answer tokenization boundary bugs.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", clean_up_tokenization_spaces=False)


def tiny_config(
    arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, **kw
) -> PretrainedConfig:
    """A small random-init config for `arch` (one of TINY_ARCHS); `kw` overrides any field.

    Dropout is 0 everywhere; bos/eos/pad ids default to 0 (the EOS id of `train_bpe_tokenizer`).
    Llama-family shapes use grouped-query attention (num_heads // 2 key/value heads when possible).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        fields = dict(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, **ids,
        )
        return GPT2Config(**{**fields, **kw})
    kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=2048, attention_dropout=0.0,
        tie_word_embeddings=False, **ids,
    )
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                  "mistral": MistralConfig}[arch]
    return config_cls(**{**fields, **kw})


def tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    **kw,
) -> PreTrainedModel:
    """A random-init fp32 causal LM sized to `tokenizer`, in eval mode, built from `seed`.

    The global torch RNG state is left untouched.
    """
    config = tiny_config(arch, len(tokenizer), hidden_size, num_layers, num_heads, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def build_tiny_checkpoint(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    texts: list[str] | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 400,
) -> Path:
    """Build (or reuse) a tiny random checkpoint loadable with `from_pretrained(out_dir)`.

    The model (safetensors) and tokenizer are written into a temp dir beside `out_dir` and then
    renamed into place, so `out_dir` is either absent or complete. A complete `out_dir` built with
    the same parameters is reused untouched; one built with different parameters, or a non-empty
    directory that is not a tiny checkpoint, raises ValueError rather than being overwritten.
    """
    out_dir = Path(out_dir)
    corpus = default_corpus() if texts is None else list(texts)
    params = dict(arch=arch, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                  vocab_size=vocab_size, corpus_sha256=hashlib.sha256(json.dumps(corpus).encode()).hexdigest())
    if _reusable(out_dir, params):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is meant to be shared
        tokenizer = train_bpe_tokenizer(corpus, vocab_size)
        model = tiny_model(arch, tokenizer, hidden_size, num_layers, seed=seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _BUILD_MARKER).write_text(json.dumps(params, sort_keys=True, indent=1))
        try:
            os.rename(tmp, out_dir)  # atomic; also replaces an empty out_dir
        except OSError:
            if not _reusable(out_dir, params):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _reusable(out_dir: Path, params: dict) -> bool:
    """True if out_dir holds a complete checkpoint built with `params`; ValueError if it clashes."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    marker = out_dir / _BUILD_MARKER
    if not marker.is_file():
        raise ValueError(f"{out_dir} exists and is not a tiny checkpoint (no {_BUILD_MARKER})")
    found = json.loads(marker.read_text())
    if found != params:
        raise ValueError(f"{out_dir} holds a tiny checkpoint built with {found}, not {params}")
    return True
