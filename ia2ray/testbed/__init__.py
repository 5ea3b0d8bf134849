"""The built-in ICL testbed: a small Llama pretrained locally on synthetic few-shot tasks
(``ia2ray.data.testbed``) so that in-context learning works on it and IA2 has something to align to.

The built model ships in this package (``model/``: safetensors, tokenizer, ``recipe.json``,
``report.json``); ``model.path: builtin:testbed`` loads it. ``python -m ia2ray.testbed`` rebuilds it
(``recipe.py``) and reports held-out zero-shot vs ICL metrics (``report.py``).

``ia2ray.core.model`` finds the shipped model as package data (importlib.resources), without
importing this package.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_NAME = "builtin:testbed"


def testbed_model_path() -> Path:
    """Directory of the shipped testbed model (loadable with ``from_pretrained``)."""
    return Path(__file__).resolve().parent / "model"
