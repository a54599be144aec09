"""Command-line plumbing shared by the runners: recipe, DeepSpeed config and `key=value` overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from engine.config import RunConfig
from engine.config_io import load_config, project_file, to_dict
from engine.errors import ConfigError


def run_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides: section.key=value, e.g. sampling.steps=20 seed=3")
    parser.add_argument("--config", default=default_config, help=f"YAML recipe (default: {default_config})")
    parser.add_argument("--ds_config", default="ds_configs/z3_offload.json", help="DeepSpeed JSON config")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: the newest complete checkpoint of the run, if any; or a checkpoint folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate config, DeepSpeed config and data, print a memory estimate, and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def print_dry_run(config: RunConfig, report: dict) -> None:
    """What --dry-run prints: the resolved run config (YAML) and the checks' report with its memory estimate (JSON)."""
    print("# resolved config")
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    print("# dry run")
    print(json.dumps(report, indent=2))


def read_ds_config(path: str | Path) -> dict:
    """Parse a DeepSpeed JSON config; errors name the file."""
    path = project_file(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config.get("zero_optimization"), dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a 'zero_optimization' section")
    return config


def parse_run(description: str, default_config: str, argv: list[str] | None = None
              ) -> tuple[argparse.Namespace, RunConfig, dict]:
    """Parse argv into (args, run config, DeepSpeed config), exiting with a one-line message on bad input."""
    parser = run_parser(description, default_config)
    args = parser.parse_args(argv)
    try:
        return args, load_config(args.config, args.overrides), read_ds_config(args.ds_config)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
