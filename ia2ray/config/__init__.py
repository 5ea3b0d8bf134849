"""Typed configuration: schema, YAML loading with overrides, generated documentation."""

from ia2ray.config.load import (
    ConfigError,
    dump_yaml,
    load_run_config,
    load_study_file,
    parse_override,
    study_defaults,
)
from ia2ray.config.schema import PIPELINES, RunConfig, StudyFile

__all__ = [
    "ConfigError",
    "PIPELINES",
    "RunConfig",
    "StudyFile",
    "dump_yaml",
    "load_run_config",
    "load_study_file",
    "parse_override",
    "study_defaults",
]
