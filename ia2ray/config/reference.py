"""Render the config models as documentation: commented example YAML and a Markdown reference.

Both come from the pydantic field descriptions, so the CLI help, the example YAML and the
config reference in docs/config.md cannot drift apart (a test checks that page against `markdown_reference()`).
"""

from __future__ import annotations

import json
from typing import Iterator

from pydantic import BaseModel

from ia2ray.config.schema import RunConfig, StudyFile


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object, str, bool]]:
    """Yield (dotted key, default, description, is_section) depth-first in declaration order."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield prefix + name, None, (ann.__doc__ or "").strip(), True
            yield from _fields(ann, prefix + name + ".")
        else:
            default = field.get_default(call_default_factory=True)
            yield prefix + name, default, field.description or "", False


def _show(value: object) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def example_yaml(model: type[BaseModel] = RunConfig) -> str:
    """Every key with its default value and its description as a comment."""
    lines = []
    for key, default, doc, is_section in _fields(model):
        depth = key.count(".")
        name = key.rsplit(".", 1)[-1]
        pad = "  " * depth
        if is_section:
            lines.append(f"{pad}{name}:")
            continue
        value = "null" if default is None else json.dumps(default)
        lines.append(f"{pad}{name}: {value}  # {doc}")
    return "\n".join(lines) + "\n"


def cli_help(model: type[BaseModel] = RunConfig) -> str:
    """Plain-text list of every key for `--help`: `key = default  description`."""
    lines = ["config keys (override any with --set KEY=VALUE):"]
    for key, default, doc, is_section in _fields(model):
        if not is_section:
            shown = "null" if default is None else _show(default)
            lines.append(f"  {key} = {shown}\n      {doc}")
    return "\n".join(lines)


def markdown_reference(model: type[BaseModel] = StudyFile) -> str:
    """A Markdown table: key, default, meaning (every run key, then the study file's `study` and `search`)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc, is_section in _fields(model):
        if not is_section:
            shown = "null" if default is None else _show(default)
            rows.append(f"| `{key}` | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_readme(path: str) -> None:
    """Rewrite the table between the config-reference markers of a Markdown file."""
    from ia2ray.fileio import write_text_atomic

    with open(path) as fh:
        text = fh.read()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    write_text_atomic(path, f"{head}{START}\n{markdown_reference()}{END}{tail}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:
        update_readme(sys.argv[1])
    else:
        print(markdown_reference(), end="")
