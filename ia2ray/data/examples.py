"""Examples and prompt formatting.

Layout (the paper's): a demo is the formatted query followed by its answer; an ICL prompt is the
demos joined by ``spec.demo_separator`` (a blank line), then the separator again, then the query::

    Text:great fun\\nLabel: 1\\n\\nText:sad\\nLabel: 0\\n\\nText:nice\\nLabel:
"""

from __future__ import annotations

from dataclasses import dataclass

from ia2ray.data.tasks import TaskSpec


@dataclass(frozen=True)
class Example:
    """One validated row.

    ``fields`` holds the task's input fields (strings); ``answer`` is the label WORD for label
    tasks and the gold text for free-text tasks; ``source`` says where the row came from
    (``"path:line"``, ``"path:row N"``, ``"hub_id[split]:row N"`` or
    ``"generator:name[split, seed S]:row N"``); unique within one source.
    """

    fields: dict[str, str]
    answer: str
    source: str


def format_query(spec: TaskSpec, ex: Example) -> str:
    """The query prompt alone: ``spec.template`` filled with the example's fields."""
    return spec.template.format(**ex.fields)


def format_answer(spec: TaskSpec, ex: Example) -> str:
    """The answer continuation that follows a query: ``spec.answer_template`` with the answer."""
    return spec.answer_template.format(answer=ex.answer)


def format_demo(spec: TaskSpec, ex: Example) -> str:
    """A demonstration: the query followed by its answer."""
    return format_query(spec, ex) + format_answer(spec, ex)


def build_icl_prompt(spec: TaskSpec, demos: list[Example], query: Example, demo_spec: TaskSpec | None = None) -> str:
    """Demos joined by the separator, the separator, then the query (just the query if no demos).
    Out of domain, the demos come from another task: `demo_spec` formats them (default: `spec`)."""
    parts = [format_demo(demo_spec or spec, d) for d in demos] + [format_query(spec, query)]
    return spec.demo_separator.join(parts)
