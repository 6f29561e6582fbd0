"""Run configuration: YAML in, validated objects out.

Every error names the file and the field (``quickstart.yaml: tasks[1].source.root: ...``)
so a user can fix a broken config without reading code. Method hyper-parameters are
validated by the config class each method registers, so a new method brings its own
fields without touching this file.
"""
from pipeline.config.load import ConfigError, load_config, parse_config
from pipeline.config.run import MethodEntry, RunConfig
from pipeline.config.sections import (BackboneConfig, BenchConfig, ChecksConfig, ExportBase, ExportConfig, RunOptions,
                                      TrainConfig)
from pipeline.data.config import DataOptions, SourceConfig, TaskConfig

__all__ = ["ConfigError", "load_config", "parse_config", "MethodEntry", "RunConfig", "BackboneConfig", "BenchConfig",
           "ChecksConfig", "ExportBase", "ExportConfig", "RunOptions", "TrainConfig", "DataOptions", "SourceConfig",
           "TaskConfig"]
