"""One options dataclass per stage: each field carries its default and help text once, validation
lives in `__post_init__`, and the CLI parser is generated from the dataclass (stepdpo.cli). Tests and
other stages build the same dataclass and call the stage function directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from stepdpo.errors import OptionsError

REQUIRED = dataclasses.MISSING


def opt(default: Any = REQUIRED, help: str = "", *, choices=None, factory: Callable | None = None,
        metavar: str | None = None) -> Any:
    """A dataclass field with CLI metadata. No default (REQUIRED) makes the flag required on the CLI
    unless a `--config` YAML sets it."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, flag: str, message: str) -> None:
    """Raise OptionsError('--flag: message') when `condition` is false."""
    if not condition:
        raise OptionsError(f"--{flag.replace('_', '-')}: {message}")


def check_choice(value: Any, flag: str, choices) -> None:
    check(value in choices, flag, f"{value!r} is not one of {', '.join(map(str, choices))}")


def as_dict(options) -> dict:
    """The options as plain JSON-able values (for reports and saved configs)."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = [str(v) for v in value] if isinstance(value, (list, tuple)) else (
            value if value is None or isinstance(value, (bool, int, float, str)) else str(value))
    return out


def config_argument(argv: list[str]) -> str | None:
    """The path after `--config` in argv (None without one), or OptionsError when the path is missing."""
    if "--config" not in argv:
        return None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise OptionsError("--config: give the YAML file's path")
    return argv[i + 1]


def read_config_file(path: str) -> dict:
    """A `--config` file's mapping, or OptionsError naming the file and what is wrong: not readable, not YAML (the
    line and the column), or not a mapping. Before, these were tracebacks (yaml's, open's, or a TypeError in the
    preflight)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise OptionsError(f"--config {path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionsError(f"--config {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict):
        raise OptionsError(f"--config {path}: not a YAML mapping of option names to values (`key: value` lines)")
    return config
