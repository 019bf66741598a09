"""Text groups for the perplexity comparison: plain text, no reference answers.

A group is named by `NAME=PATH` or by the path's stem, and PATH is one of:

* a `.txt` file: one text per block, blocks separated by one or more blank lines;
* a `.jsonl` file: one text per line, the line's `"text"` field (a string);
* a folder: one text per `*.txt` file in it (sorted by name; not recursive), each file whole.

A group with no text, a missing path, an unknown suffix, a bad JSONL line or two groups of one
name are bad input (TunelensError, one line).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunelens.errors import TunelensError

GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # it becomes part of MLflow metric names


@dataclass(frozen=True)
class TextGroup:
    """One named group of texts, and whether it must not get worse (a guard)."""

    name: str
    texts: tuple[str, ...]
    source: str
    guard: bool = False


def _blocks(path: Path) -> list[str]:
    """A .txt file's texts: blocks separated by blank lines, each stripped."""
    return [b.strip() for b in re.split(r"\n\s*\n", _read(path)) if b.strip()]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TunelensError(f"text file {path} is not UTF-8 text") from None


def _jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TunelensError(f"{path} line {number} is not JSON: every line must be an object "
                                'with a "text" field') from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TunelensError(f'{path} line {number} has no string "text" field')
        if text.strip():
            texts.append(text)
    return texts


def read_texts(path: Path) -> list[str]:
    """The texts at `path` (.txt blocks, .jsonl "text" fields, or one per .txt file of a folder)."""
    if path.is_dir():
        return [text for file in sorted(path.glob("*.txt")) if (text := _read(file).strip())]
    if not path.is_file():
        raise TunelensError(f"text group {path} does not exist")
    if path.suffix == ".txt":
        return _blocks(path)
    if path.suffix == ".jsonl":
        return _jsonl(path)
    raise TunelensError(f"text group {path}: use a .txt file (blank-line-separated texts), a "
                        '.jsonl file (a "text" field per line) or a folder of .txt files')


def parse_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (the name is the path's stem) -> (name, path)."""
    name, sep, rest = spec.partition("=")
    if sep and GROUP_NAME.match(name) and rest:
        return name, Path(rest)
    path = Path(spec)
    return path.stem if path.suffix else path.name, path


def load_groups(specs: dict[str, str] | list[str] | tuple[str, ...], guard=(),
                max_texts: int | None = None) -> list[TextGroup]:
    """Text groups from `{name: path}` or `["NAME=PATH" | "PATH", ...]`; `guard` names the groups
    that must not get worse; `max_texts` keeps the first texts of each group (file order)."""
    pairs = (list(specs.items()) if isinstance(specs, dict) else
             [parse_spec(str(spec)) for spec in specs])
    groups: dict[str, TextGroup] = {}
    for name, path in pairs:
        if not GROUP_NAME.match(name):
            raise TunelensError(f"text group name {name!r} may hold only letters, digits, '_', "
                                "'-' and '.': name it with NAME=PATH")
        if name in groups:
            raise TunelensError(f"two text groups are named {name!r}: name them with NAME=PATH")
        path = Path(path).expanduser()
        texts = read_texts(path)
        if not texts:
            raise TunelensError(f"text group {name!r} ({path}) holds no text")
        if max_texts is not None:
            texts = texts[:max_texts]
        groups[name] = TextGroup(name, tuple(texts), str(path), name in set(guard))
    unknown = sorted(set(guard) - set(groups))
    if unknown:
        raise TunelensError(f"--guard {', '.join(unknown)}: no text group of that name (groups: "
                            f"{', '.join(groups) or 'none'})")
    return list(groups.values())
