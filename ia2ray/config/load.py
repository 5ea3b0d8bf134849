"""Load a run config from YAML plus `--set a.b=value` overrides, validating everything at once.

Every problem (bad YAML, unknown key, wrong type, bad override) is collected with its dotted path and
the file and line it came from, and raised together as one `ConfigError` before anything heavy starts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from ia2ray.config.schema import RunConfig, StudyFile

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """All problems found in a config, one line each."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) in {source}:\n{lines}")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is parsed as YAML (`3`, `1e-4`, `[0, 2]`, `true`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. lora.rank=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-4` as a string
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `tree[a][b] = value` for key `a.b`, creating sections (a null becomes one: `task.ood.fins:
    null` then `--set task.ood.fins.template=...`); refuses to descend into any other scalar."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is a value, not a section (in --set {key}=...)")
        node = child
    node[parts[-1]] = value


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML mapping document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _format_errors(exc: ValidationError, where: dict[tuple, str]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        origin = next((where[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in where), "")
        origin = origin or next((v for k, v in where.items() if loc and k[: len(loc)] == loc), "")
        out.append(f"{dotted}: {msg}" + (f"  [{origin}]" if origin else ""))
    return out


def load_raw(path: Optional[str | Path]) -> tuple[dict, dict[tuple, str], list[str]]:
    """Read a YAML file into a dict; returns (data, key path -> 'file:line', errors)."""
    if path is None:
        return {}, {}, []
    p = Path(path)
    if not p.is_file():
        return {}, {}, [f"config file not found: {p}"]
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        return {}, {}, [f"{p}{line}: invalid YAML ({getattr(exc, 'problem', exc)})"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return {}, {}, [f"{p}: the top level must be a mapping of sections, got {type(data).__name__}"]
    return data, {k: f"{p}:{v}" for k, v in _yaml_lines(text).items()}, []


def with_overrides(data: dict, where: dict[tuple, str], overrides) -> tuple[dict, list[str]]:
    """A copy of `data` with each `--set KEY=VALUE` applied (origins recorded in `where`); the errors."""
    data = copy.deepcopy(data)
    errors: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
            set_dotted(data, key, value)
            where[tuple(key.split("."))] = f"--set {text}"
        except ValueError as exc:
            errors.append(str(exc))
    return data, errors


def load_run_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Load a run config (or a study file, whose searched parameters take their defaults).

    Raises ConfigError listing every problem with its dotted key and origin (file:line or --set).
    """
    data, where, file_errors = load_raw(path)
    data, errors = with_overrides(data, where, overrides)
    source = str(path) if path else "the default config"
    if file_errors:
        raise ConfigError(file_errors + errors, source)

    is_study = "search" in data or "study" in data
    try:
        parsed = (StudyFile if is_study else RunConfig).model_validate(data)
    except ValidationError as exc:
        errors += _format_errors(exc, where)
    if errors:
        raise ConfigError(errors, source)
    if not is_study:
        return parsed
    return study_defaults(parsed, where, source)


def load_study_file(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[StudyFile, dict[tuple, str]]:
    """Load a study file with `--set` overrides (which may also set `study.*` and `search.*` keys).

    Returns the study and its key path -> origin ('file:line' or '--set ...') map; raises ConfigError
    listing every problem."""
    data, where, file_errors = load_raw(path)
    data, errors = with_overrides(data, where, overrides)
    errors = file_errors + errors
    if errors:
        raise ConfigError(errors, str(path))
    try:
        study = StudyFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where), str(path)) from None
    return study, where


def study_defaults(study: StudyFile, where: dict | None = None, source: str = "study") -> RunConfig:
    """The run config of a study file with every searched parameter set to its default."""
    base = study.model_dump(exclude={"search", "study"})
    errors = []
    for key, param in study.search.params.items():
        if not _has_path(base, key):
            errors.append(f"search.params.{key}: no such config key")
            continue
        if param.default is not None:
            set_dotted(base, key, param.default)
    if errors:
        raise ConfigError(errors, source)
    try:
        return RunConfig.model_validate(base)
    except ValidationError as exc:
        msgs = [f"{m} (a search default)" for m in _format_errors(exc, where or {})]
        raise ConfigError(msgs, source) from None


def _has_path(tree: dict, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run records next to its results)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
