"""Load a task's rows as validated :class:`Example` objects.

Sources, in order of precedence: a local file (``.jsonl``, ``.csv`` or ``.parquet``, chosen by
extension), the Hugging Face hub (``spec.hub_id``), the spec's built-in generator.

Every row is checked (input fields present and non-empty text, label present and, for label
tasks, one of ``spec.label_words``); ALL problems are collected and raised as one
:class:`DataError` whose message lists them as ``location: problem``. Locations: jsonl and csv
``path:LINE`` (1-based physical line, csv header = line 1), parquet ``path:row N`` and hub
``hub_id[split]:row N`` (0-based row index, as in ``table[N]``).
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

from ia2ray.config.schema import label_key
from ia2ray.data.examples import Example
from ia2ray.data.synthetic import generate_rows
from ia2ray.data.tasks import TaskSpec
from ia2ray.data.transforms import TRANSFORMS

MAX_LISTED_PROBLEMS = 20

Record = tuple[str, "dict[str, Any] | str"]  # (location, raw row or a problem found while reading)


class DataError(ValueError):
    """Bad input data. ``problems`` holds every ``location: problem`` line found."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def load_examples(spec: TaskSpec, path: str | Path | None = None, split: str = "train", seed: int = 0) -> list[Example]:
    """Rows of ``spec`` as examples, in source order (pooling/shuffling is the caller's job).

    ``split`` is ``"train"`` or ``"eval"`` (mapped to ``spec.train_split`` / ``spec.eval_split`` on
    the hub; any other value is used as the hub split name as is). ``seed`` only affects
    generated data: ``(split, seed)`` selects an independent generator stream of
    ``spec.train_pool`` (train) or ``spec.eval_pool`` (other splits) rows. ``path`` wins over the hub
    and the generator.
    """
    if path is not None:
        return load_file(spec, path)
    if spec.hub_id:
        return _load_hub(spec, split)
    if spec.generator:
        return _load_generated(spec, split, seed)
    raise DataError(f"task {spec.name!r} has no data source: pass a path, or set hub_id or generator")


def load_file(spec: TaskSpec, path: str | Path) -> list[Example]:
    """Examples from a local ``.jsonl`` / ``.csv`` / ``.parquet`` file."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in _READERS:
        raise DataError(f"{p}: unsupported file extension {ext or '(none)'!r} (expected .jsonl, .csv or .parquet)")
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    records, column_loc = _READERS[ext](p)
    return _to_examples(spec, records, str(p), column_loc)


def _read_jsonl(path: Path) -> tuple[list[Record], str | None]:
    records: list[Record] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff" if lineno == 1 else "")
            except UnicodeDecodeError as exc:
                records.append((loc, f"not valid UTF-8 ({exc.reason})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                records.append((loc, f"malformed JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                records.append((loc, f"expected a JSON object, got {type(row).__name__}"))
                continue
            records.append((loc, row))
    return records, None


def _read_csv(path: Path) -> tuple[list[Record], str | None]:
    records: list[Record] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return records, f"{path}:1"
            last_line = reader.line_num
            try:
                for row in reader:
                    loc = f"{path}:{last_line + 1}"  # first physical line of this row
                    last_line = reader.line_num
                    if not row:
                        continue  # blank line
                    if len(row) != len(header):
                        records.append((loc, f"{len(row)} fields but the header has {len(header)}"))
                        continue
                    records.append((loc, dict(zip(header, row))))
            except csv.Error as exc:
                records.append((f"{path}:{reader.line_num}", f"malformed CSV: {exc} (rest of file skipped)"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason})") from exc
    return records, f"{path}:1"


def _read_parquet(path: Path) -> tuple[list[Record], str | None]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read parquet file: {exc}") from exc
    return [(f"{path}:row {i}", row) for i, row in enumerate(rows)], str(path)


_READERS: dict[str, Callable[[Path], tuple[list[Record], str | None]]] = {
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


PARQUET_EXPORT = "refs/convert/parquet"  # the hub's own parquet copy of a dataset, kept for script datasets too
SCRIPT_REFUSED = "Dataset scripts are no longer supported"  # datasets >= 4 on a repository with a loading script


def _load_hub(spec: TaskSpec, split: str) -> list[Example]:
    import datasets

    hub_split = {"train": spec.train_split, "eval": spec.eval_split}.get(split, split)
    where = f"hub dataset {spec.hub_id!r} (config {spec.hub_config!r}, split {hub_split!r})"
    try:
        try:
            ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
        except RuntimeError as exc:  # a repository still on a loading script: read the hub's parquet export
            if SCRIPT_REFUSED not in str(exc):
                raise
            where += f", its loading script refused, then revision {PARQUET_EXPORT!r}"
            ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split, revision=PARQUET_EXPORT)
    except Exception as exc:  # network, auth, unknown split ...: all mean "no data"
        raise DataError(f"cannot load {where}: {exc}") from exc
    source = f"{spec.hub_id}[{hub_split}]"
    records = [(f"{source}:row {i}", dict(row)) for i, row in enumerate(ds)]
    return _to_examples(spec, records, source, None)


def _load_generated(spec: TaskSpec, split: str, seed: int) -> list[Example]:
    assert spec.generator is not None
    n_rows = spec.train_pool if split == "train" else spec.eval_pool
    stream_seed = zlib.crc32(f"{spec.generator}|{split}|{seed}".encode())
    source = f"generator:{spec.generator}[{split}, seed {seed}]"
    rows = generate_rows(spec.generator, n_rows, stream_seed)
    records = [(f"{source}:row {i}", row) for i, row in enumerate(rows)]
    return _to_examples(spec, records, source, None)


def _cell_problem(row: dict[str, Any], col: str, kinds: tuple[type, ...], kind_name: str) -> str | None:
    """Why ``row[col]`` is unusable (absent, null, wrong type, blank), or None when it is fine."""
    value = row.get(col)
    if col not in row:
        return f"missing column '{col}'"
    if value is None:
        return f"missing value in column '{col}'"
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f"column '{col}' must be {kind_name}, got {type(value).__name__} {value!r}"
    if not label_key(value):
        return f"empty value in column '{col}'"
    return None


def _check_row(spec: TaskSpec, row: dict[str, Any], skip: set[str]) -> tuple[list[str], dict[str, str], str]:
    """Problems of one row (without location), its input fields and its answer.

    Columns in ``skip`` (already reported as absent from the whole file) are not checked.
    """
    problems: list[str] = []
    fields: dict[str, str] = {}
    for col in (c for c in spec.input_fields if c not in skip):
        problem = _cell_problem(row, col, (str,), "text")
        if problem:
            problems.append(problem)
        else:
            fields[col] = row[col]
    col, answer = spec.label_field, ""
    if col in skip:
        return problems, fields, answer
    problem = _cell_problem(row, col, (str, int, float, bool), "text, a number or a boolean")
    key = None if problem else label_key(row[col])
    if problem:
        problems.append(problem)
    elif spec.label_words is None:
        answer = without_stops(spec, key)
    elif key in spec.label_words:
        answer = spec.label_words[key]
    else:
        expected = ", ".join(f"'{k}'" for k in spec.label_words)
        problems.append(f"unknown label '{key}' (expected one of {expected})")
    return problems, fields, answer


def without_stops(spec: TaskSpec, answer: str) -> str:
    """A gold free-text answer with its blank-line runs collapsed to one newline when the task stops decoding
    at a blank line: an answer holding one (312 of 1744 MATH-Algebra train solutions, 600 of 2500
    GSM-Symbolic p2 answers, 6 GSM8K answers) would end its demo early and teach SFT to stop before the
    final answer. Stop strings with visible characters are left alone."""
    for stop in spec.stop_strings:
        if stop.strip() or stop not in answer:
            continue
        while stop in answer:
            answer = answer.replace(stop, stop[:-1] if len(stop) > 1 else "")
    return answer


def _to_examples(spec: TaskSpec, records: list[Record], source: str, column_loc: str | None) -> list[Example]:
    """Validate ``records`` and build examples; raise one DataError listing every problem, in
    source order (a column that no row has is reported once, at ``column_loc`` or the first row)."""
    rows = [(loc, row) for loc, row in records if isinstance(row, dict)]
    if not records:
        raise DataError(f"{source}: no data rows")
    transform = TRANSFORMS[spec.transform] if spec.transform else None
    required = list(transform.columns) if transform else [*spec.input_fields, spec.label_field]
    absent = {c for c in required if rows and all(c not in row for _, row in rows)}
    problems: list[str] = []
    seen = ", ".join(sorted({k for _, row in rows for k in row}))
    loc0 = column_loc or (rows[0][0] if rows else source)
    for col in (c for c in required if c in absent):
        problems.append(f"{loc0}: missing column '{col}' (no row has it; columns found: {seen})")
    examples: list[Example] = []
    for loc, row in records:
        if isinstance(row, str):
            problems.append(f"{loc}: {row}")
            continue
        if transform:
            missing = [c for c in transform.columns if c not in absent and row.get(c) is None]
            if missing:
                problems += [f"{loc}: missing value in column '{c}'" for c in missing]
                continue
            if absent:
                continue  # already reported for the whole file
            try:
                row = transform.build(row)
            except ValueError as exc:
                problems.append(f"{loc}: {exc}")
                continue
        if spec.drop_labels and row.get(spec.label_field) is not None \
                and label_key(row[spec.label_field]) in spec.drop_labels:
            continue  # a known class the task leaves out
        row_problems, fields, answer = _check_row(spec, row, absent)
        problems += [f"{loc}: {p}" for p in row_problems]
        if not row_problems:
            examples.append(Example(fields=fields, answer=answer, source=loc))
    if problems:
        raise DataError(_summarize(source, problems), problems)
    return examples


def _summarize(source: str, problems: list[str]) -> str:
    """``N problem(s) in SOURCE:`` followed by at most MAX_LISTED_PROBLEMS lines and a tail count."""
    lines = [f"{len(problems)} problem(s) in {source}:"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)
