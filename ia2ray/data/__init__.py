"""Data layer: task specs, loaders with row-level validation, N-shot splits, ICL prompts, parsers.

Imports only ``ia2ray.config`` and third-party libraries (never ``ia2ray.core``).
"""

from ia2ray.data.examples import Example, build_icl_prompt, format_answer, format_demo, format_query
from ia2ray.data.loaders import DataError, load_examples, load_file
from ia2ray.data.parsers import PARSERS, get_parser, normalize_number, register_parser
from ia2ray.data.splits import (
    Splits,
    dev_size,
    icl_demo_draws,
    make_splits,
    pools,
    training_demos,
    training_prompts,
)
from ia2ray.data.synthetic import GENERATORS, generate_rows, register_generator
from ia2ray.data.tasks import TaskSpec, get_task, register_task, task_names, template_fields

# Registers the built-in testbed tasks (testbed/...) and their generators, and the paper's benchmarks.
from ia2ray.data import benchmarks, testbed  # noqa: E402,F401  (imported for their side effect)

__all__ = [
    "DataError",
    "Example",
    "GENERATORS",
    "PARSERS",
    "Splits",
    "TaskSpec",
    "build_icl_prompt",
    "dev_size",
    "format_answer",
    "format_demo",
    "format_query",
    "generate_rows",
    "get_parser",
    "get_task",
    "icl_demo_draws",
    "load_examples",
    "load_file",
    "make_splits",
    "normalize_number",
    "pools",
    "register_generator",
    "register_parser",
    "register_task",
    "task_names",
    "template_fields",
    "training_demos",
    "training_prompts",
]
