"""Task specifications: how a dataset's rows become prompts and answers, and a registry of them.

A :class:`TaskSpec` is pure data (a frozen pydantic model), so it can live in a study YAML file, be
hashed into cache keys (``spec.model_dump()``) and be shipped to Ray workers.
"""

from __future__ import annotations

import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ia2ray.config.schema import label_key
from ia2ray.data.parsers import PARSERS
from ia2ray.data.synthetic import GENERATORS
from ia2ray.data.transforms import TRANSFORMS


def template_fields(template: str) -> list[str]:
    """Names of the ``{placeholders}`` of a ``str.format`` template, in order of appearance.

    ``{a.b}`` / ``{a[0]}`` count as ``a``; positional ``{}`` / ``{0}`` appear as ``""`` / ``"0"``.
    Raises ``ValueError`` for a malformed template (e.g. an unmatched brace).
    """
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if root not in names:
            names.append(root)
    return names


class TaskSpec(BaseModel):
    """One task: prompt template, answer format, label words, parser and where its data comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Registry name, e.g. 'sst2' or 'toy/reverse'.")
    template: str = Field(description="Query template, str.format over row fields: 'Text:{text}\\nLabel:'.")
    answer_template: str = Field(" {answer}", description="Appended to the query to form a demo/target.")
    input_fields: list[str] = Field(min_length=1, description="Row columns the template reads.")
    label_field: str = Field(min_length=1, description="Row column holding the label / gold answer.")
    label_words: dict[str, str] | None = Field(
        None, description="Raw label value (as str) -> label word; None for free-text answers."
    )
    answer_type: Literal["label", "text"] = Field(description="'label': single label word; 'text': free text.")
    parser: str = Field("strip", description="Name of the answer parser in ia2ray.data.parsers.PARSERS.")
    demo_separator: str = Field("\n\n", description="Between demos, and between the last demo and the query.")
    stop_strings: list[str] = Field(default_factory=lambda: ["\n\n"], description="Decoding stops on these.")
    max_new_tokens: int = Field(1, ge=1, description="Generation budget (1 for single-token label tasks).")
    hub_id: str | None = Field(None, description="Hugging Face dataset id, e.g. 'stanfordnlp/sst2'.")
    hub_config: str | None = Field(None, description="Dataset config name on the hub, if any.")
    train_split: str = Field("train", description="Hub split the train pool comes from.")
    eval_split: str = Field("test", description="Hub split the eval pool comes from.")
    train_pool: int = Field(2000, ge=1, description="Train pool size (paper: 2000).")
    eval_pool: int = Field(500, ge=1, description="Eval pool size (paper: 500).")
    generator: str | None = Field(None, description="Built-in synthetic generator (ia2ray.data.synthetic).")
    drop_labels: list[str] = Field(
        default_factory=list, description="Raw label values that are known but left out (their rows are dropped), "
        "e.g. FinS's neutral class; any other label not in label_words is an error.")
    eval_holdout: int | None = Field(
        None, ge=1, description="For datasets with one usable split: after the pool shuffle the last K rows are the "
        "eval pool and the train pool comes from the rest (FinS, StrategyQA, GSM-Symbolic: 500). Applies to "
        "`task.path` too when no `task.eval_path` is given.")
    transform: str | None = Field(
        None, description="Row transform (ia2ray.data.transforms.TRANSFORMS) that builds the input fields and the "
        "label from a raw row (e.g. shuffled, remapped MCQ options); the raw columns it reads are then required.")

    @field_validator("label_words", mode="before")
    @classmethod
    def _label_keys_as_str(cls, value: Any) -> Any:
        """YAML writes ``{0: negative}``: accept int/bool keys and compare them as strings."""
        if isinstance(value, dict):
            return {label_key(k): v for k, v in value.items()}
        return value

    @field_validator("drop_labels", mode="before")
    @classmethod
    def _dropped_as_str(cls, value: Any) -> Any:
        """As the loader writes raw labels: ``1``, ``1.0`` and ``"1"`` are all ``"1"``."""
        if not isinstance(value, list):
            return value
        return [label_key(v) for v in value]

    @model_validator(mode="after")
    def _check_consistency(self) -> "TaskSpec":
        """Collect every inconsistency and report them together."""
        problems: list[str] = []
        try:
            placeholders = template_fields(self.template)
        except ValueError as exc:
            problems.append(f"template is not a valid format string: {exc}")
            placeholders = []
        unknown = [p for p in placeholders if p not in self.input_fields]
        if unknown:
            shown = ", ".join("{" + p + "}" for p in unknown)
            problems.append(f"template placeholders {shown} are not in input_fields {self.input_fields}")
        try:
            answer_fields = template_fields(self.answer_template)
        except ValueError as exc:
            problems.append(f"answer_template is not a valid format string: {exc}")
            answer_fields = ["answer"]
        if answer_fields != ["answer"]:
            problems.append(f"answer_template must use exactly the placeholder {{answer}}, got {answer_fields}")
        if self.answer_type == "label":
            if not self.label_words:
                problems.append("answer_type 'label' requires label_words")
            else:
                words = list(self.label_words.values())
                if any(not w.strip() for w in words):
                    problems.append("label_words must not be empty or whitespace")
                if len(set(words)) != len(words):
                    problems.append(f"label_words must be distinct, got {words}")
        elif self.label_words is not None:
            problems.append("label_words is only allowed with answer_type 'label'")
        if self.parser not in PARSERS:
            problems.append(f"unknown parser {self.parser!r} (known: {', '.join(sorted(PARSERS))})")
        if self.transform is not None and self.transform not in TRANSFORMS:
            problems.append(f"unknown transform {self.transform!r} (known: {', '.join(sorted(TRANSFORMS))})")
        overlap = sorted(set(self.drop_labels) & set(self.label_words or {}))
        if overlap:
            problems.append(f"drop_labels {overlap} are also in label_words")
        if self.generator is not None and self.generator not in GENERATORS:
            problems.append(f"unknown generator {self.generator!r} (known: {', '.join(sorted(GENERATORS))})")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))
        return self


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Register ``spec`` under ``spec.name``. Re-registering an identical spec is a no-op; a
    different spec under a taken name needs ``replace=True``."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec and not replace:
        raise ValueError(f"task {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered spec called ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    """Sorted names of all registered tasks."""
    return sorted(_REGISTRY)


BINARY_DIGITS = {"0": "0", "1": "1"}
# Digit labels follow "Label:" directly: Llama-3 and Qwen tokenizers split " 1" into " " + "1", so
# "Label:1" keeps the label a single next token.
DIGIT_ANSWER = "{answer}"

register_task(
    TaskSpec(
        name="toy/polarity",
        template="Text:{text}\nLabel:",
        input_fields=["text"],
        label_field="label",
        label_words=BINARY_DIGITS,
        answer_template=DIGIT_ANSWER,
        answer_type="label",
        generator="polarity",
    )
)
register_task(
    TaskSpec(
        name="toy/reverse",
        template="Question:{text}\nAnswer:",
        input_fields=["text"],
        label_field="answer",
        answer_type="text",
        parser="strip",
        max_new_tokens=8,
        stop_strings=["\n\n"],
        generator="reverse",
    )
)


# The task keys a config may override on a registered task (`task.template`, `task.label_words`, ...).
FORMAT_KEYS = ("template", "answer_template", "input_fields", "label_field", "label_words", "drop_labels",
               "demo_separator", "stop_strings")


def resolve_task(name: str, overrides: dict[str, Any] | None = None, define: dict[str, Any] | None = None,
                 where: str = "task") -> TaskSpec:
    """The task a config asks for: the registered spec ``name`` with ``overrides`` (keys of
    ``FORMAT_KEYS``) applied, or, with ``define``, a new spec called ``name`` built from those
    ``TaskSpec`` fields (``overrides`` then apply on top). Errors name the config key: ``task.<key>``,
    or ``<where>.<key>`` for the overrides of an out-of-domain target (``where="task.ood.fins"``)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if define is not None:
        if name in _REGISTRY:
            raise ValueError(f"task.define: {name!r} is a registered task; give the new task another task.name "
                             "(or override single keys such as task.template)")
        if "name" in define:
            raise ValueError("task.define.name: the new task's name is task.name; drop the key")
        fields = {"name": name, **define, **overrides}
        where = f"{where}.define"
    else:
        try:
            base = get_task(name)
        except KeyError as exc:
            raise ValueError(f"{where}.name: {exc.args[0]} (declare a new task with task.define)") from None
        if not overrides:
            return base
        fields = {**base.model_dump(), **overrides}
        # a new label set replaces the old one: old label values are no longer "known but left out"
        if "label_words" in overrides and "drop_labels" not in overrides:
            fields["drop_labels"] = [v for v in base.drop_labels if str(v) not in {str(k) for k in overrides["label_words"]}]
    try:
        return TaskSpec(**fields)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{where}: {_short(exc)}") from None


def _short(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for e in errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"].removeprefix("Value error, "))
    return "; ".join(parts)
