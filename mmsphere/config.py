"""The configuration machinery: YAML, typed ``dotted.key=value`` overrides, the typed tree, error reports.

A configuration is a tree of dataclasses. Each *section* (``model``, ``data``, ``loss``, ...) is
declared, and validated, by the package that uses it, and the run's root assembles them
(ARCHITECTURE.md, Layers); this module knows none of them. It reads YAML, applies overrides parsed
by the declared type of their field, builds the tree (unknown keys are reported with the closest
valid key, wrong types with the key and the value) and writes a tree back as YAML.

A section class may define two hooks, both called while the tree is built:

- ``migrate(cls, raw: dict) -> dict`` (a classmethod): rewrites the section's raw mapping before
  its keys are checked (older spellings of keys, for instance);
- ``validate(self) -> None``: raises :class:`ConfigError` for values that are well-typed but
  impossible; called on each section once its own fields are built, so a root sees valid sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

# the error family lives in mmsphere.errors; re-exported here, where it was first defined
from mmsphere.errors import ConfigError, DataError, MmsphereError  # noqa: F401

__all__ = ["BOOLEAN_WORDS", "NULL_WORDS", "load_yaml", "read_yaml_file", "read_config", "apply_override", "build_config",
           "config_to_dict", "save_config", "require"]

T = TypeVar("T")


# Words a bool field accepts, from YAML files and overrides alike (case-insensitive).
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
# Words that mean None in an override of a nullable field (case-insensitive; an empty value too).
NULL_WORDS = ("null", "none", "~", "")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so ``precision: no`` is the string 'no'."""


# YAML 1.1, PyYAML's default, also reads unquoted yes/no/on/off as booleans. Then `precision: no`
# (accelerate's spelling) would arrive as False, and False could have been written no, off or
# false, so a string field could not tell what was meant. Reading those words as strings keeps
# what the user wrote; a bool field still takes them (BOOLEAN_WORDS), and a string field that
# receives true/false is an error that asks for quotes rather than a guess.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML the way config files are read (YAML 1.2 booleans; see :class:`_YamlLoader`)."""
    return yaml.load(text, Loader=_YamlLoader)


def read_config(root: type, path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a YAML file (empty without one) with ``dotted.key=value`` overrides applied.

    ``root`` is the dataclass the mapping describes; overrides are parsed by the types it declares.
    """
    raw = read_yaml_file(path) if path is not None else {}
    for override in overrides or []:
        apply_override(raw, override, root)
    return raw


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (empty for an empty file); ConfigError if it is missing or no mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return raw


def apply_override(raw: dict[str, Any], override: str, root: type) -> None:
    """Set ``dotted.key=value`` in a raw config dict, the value read as the declared type of its field.

    A string field takes the text as written (``train.precision=no`` is ``"no"``; quote it as YAML,
    ``key="'a b'"``, to strip the quotes); a nullable field takes null, none, ~ or nothing as None;
    a bool field true/false, yes/no, on/off; a number field a number. Lists, mappings, whole
    sections and keys without a declared type (in the dataclass ``root``) are parsed as YAML. An integer part indexes a list:
    ``data.train.0.urls=...`` sets the first source's urls, ``train.betas.1=0.95`` the second beta.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    node: dict[str, Any] | list[Any] = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            child = node[_list_index(node, parts[: depth + 1], override)]
        else:
            child = node.get(part)
            if child is None:
                # a list the config does not set is its default (train.betas), so that an index can name an entry
                default = _declared_default(root, parts[: depth + 1]) if parts[depth + 1].isdigit() else None
                child = node[part] = {} if default is None else default
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section or a list")
        node = child
    value = _parse_override(_declared_type(root, parts), text.strip(), key)
    if isinstance(node, list):
        node[_list_index(node, parts, override)] = value
    else:
        node[parts[-1]] = value


def _list_index(entries: list[Any], parts: list[str], override: str) -> int:
    """The entry of a list that the last of ``parts`` names, or a ConfigError naming the list and its length."""
    name, part = ".".join(parts[:-1]), parts[-1]
    count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    if not part.isdigit():
        raise ConfigError(f"override {override!r}: {name} is a list of {count}; name one by its index, as in "
                          f"{name}.0.{part}")
    index = int(part)
    if index >= len(entries):
        size = f"{name} has {count} (0 to {len(entries) - 1})" if entries else f"{name} is empty"
        raise ConfigError(f"override {override!r}: index {index} is out of range: {size}; to add entries, set the "
                          f"whole list ({name}=[...])")
    return index


def _declared_type(root: type, parts: list[str]) -> Any:
    """The type hint of the field that the dotted key names, or None for a key no field declares."""
    hint: Any = root
    for part in parts:
        hint, _ = _without_none(hint)
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            if part not in hints:
                return None  # unknown: _build reports it with the closest valid key
            hint = hints[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        elif typing.get_origin(hint) in (list, tuple) and part.isdigit():
            entries = typing.get_args(hint)  # list[X]: every entry an X; tuple[X, Y]: one type per entry
            hint = entries[0] if typing.get_origin(hint) is list else entries[min(int(part), len(entries) - 1)]
        else:
            return None
    return hint


def _declared_default(root: type, parts: list[str]) -> list[Any] | None:
    """The default of the list field that the dotted key names, as plain data; None for any other key."""
    default: Any = config_to_dict(root())
    for part in parts:
        default = default.get(part) if isinstance(default, dict) else None
    return default if isinstance(default, list) else None


def _parse_override(hint: Any, text: str, key: str) -> Any:
    """The plain value of an override's text for a field of type ``hint``; :func:`_coerce` checks it."""
    inner, nullable = _without_none(hint)
    if nullable and text.lower() in NULL_WORDS:
        return None
    if inner is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return _parse_yaml(text, key)  # a quoted YAML scalar: the quotes are not part of the value
        return text
    if inner is bool:
        return text  # _coerce maps BOOLEAN_WORDS and names the key for anything else
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be an integer") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be a number") from None
    return _parse_yaml(text, key) if text else None


def _parse_yaml(text: str, key: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r} is not valid YAML: {error}") from None


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner[0], True
    return hint, False


def build_config(cls: type[T], raw: dict[str, Any] | None, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a plain nested dict, migrating and validating every section.

    ``prefix`` names where the mapping sits in the whole configuration (``"model."``), for messages.
    """
    return _build(cls, raw, prefix)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config tree (or one section) as plain YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        raw = migrate(raw)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, f"{prefix}{key}")
    built = cls(**values)
    validate = getattr(built, "validate", None)
    if validate is not None:
        validate()
    return built


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(arg, item, key) for arg, item in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {str(name): _coerce(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if hint is bool:
        if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false (or yes/no, on/off)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 2e-3 (no dot) as a string; users mean the number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            # only YAML's unquoted true/false get here (see _YamlLoader); which string was meant is a guess
            raise ConfigError(f"{key}={value!r} must be a string; YAML reads unquoted true/false as "
                              f"booleans, so write the string you mean in quotes")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# for the sections' own checks


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
