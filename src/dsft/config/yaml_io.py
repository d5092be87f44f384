"""Read a YAML config safely: one-line errors for unreadable files, and YAML alias bombs refused before expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dsft.config.seed import quote
from dsft.errors import ConfigError

MAX_ALIAS_EXPANSION = 100_000
"""Nodes that aliases (*name) may add when the document is expanded; a config needs a handful."""


class _AliasGuard:
    """Counts the nodes of the composed YAML graph as expanded (an alias counts its whole target again)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()

    def size(self, node: yaml.Node) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise ConfigError("recursive YAML alias (an anchor used inside itself)")
        self.open.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                n += self.size(child)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                n += self.size(k) + self.size(v)
        self.open.discard(key)
        self.sizes[key] = n
        if n - len(self.sizes) > self.limit:
            raise ConfigError(f"YAML aliases expand to more than {self.limit:,} extra nodes (an alias bomb?); "
                              f"write the values out or use fewer aliases")
        return n


def safe_load(text: str, *, limit: int = MAX_ALIAS_EXPANSION) -> Any:
    """yaml.safe_load, but the node graph is measured as expanded before any Python object is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _AliasGuard(limit).size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_config_text(p: Path) -> str:
    """The config file's text, or one ConfigError line (missing, a directory, unreadable, not UTF-8)."""
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; expected a YAML config file")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the config file ({err.strerror or type(err).__name__})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          f"save the config as UTF-8") from err


def load_yaml_file(p: Path) -> Any:
    """Parse a YAML config file into Python objects; errors are one line naming the file."""
    text = read_config_text(p)
    try:
        return safe_load(text)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{p}: YAML nested too deeply") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0][:200]
        raise ConfigError(f"{p}:{where} not valid YAML ({problem})") from err


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items → {key: YAML value}; one-line ConfigError for a malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {quote(item)}: expected KEY=VALUE (e.g. train.max_steps=20)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = safe_load(value) if value.strip() else None
        except (yaml.YAMLError, ConfigError) as err:
            why = str(getattr(err, "problem", None) or err).splitlines()[0][:200]
            raise ConfigError(f"--set {quote(key.strip(), 80)}: value is not valid YAML ({why})") from err
    return out
