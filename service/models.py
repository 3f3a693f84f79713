"""Which checkpoints one service serves, under which names: ``--weights`` entries -> :class:`ModelSpec`.

An entry is ``NAME=PATH`` or a plain ``PATH``. ``PATH`` is a checkpoint folder
(``glow.safetensors`` + ``glow.json``), its ``.safetensors`` file, a folder of checkpoint
folders (each served under its folder's name), or the name of a shipped checkpoint
(``fashion-mnist``, ``mnist``) when no such path exists. A plain checkpoint path is served
under its folder's name (``weights/mnist`` -> ``mnist``). One ``--weights`` value or
``GLOW_WEIGHTS`` may hold several entries separated by :data:`SEPARATOR`. The first
model is the default, served by the routes without a ``/models/{name}`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SEPARATOR = ","
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEIGHTS_FILE = "glow.safetensors"
SHIPPED = ("fashion-mnist", "mnist", "fashion-mnist-classes", "mnist-classes", "photos")
REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
PACKAGED_WEIGHTS = "glow_weights"  # the repository's weights/ folder, installed as package data


@dataclass(frozen=True)
class ModelSpec:
    """One model of the service: the name it is served under and its checkpoint."""

    name: str
    path: Path


def shipped_weights(name: str) -> Path:
    """The folder of a shipped checkpoint: the repository's ``weights/NAME`` in a checkout, else the installed copy."""
    local = REPO_WEIGHTS / name
    if (local / WEIGHTS_FILE).is_file():
        return local
    try:
        installed = Path(str(resources.files(PACKAGED_WEIGHTS) / name))
    except ModuleNotFoundError:
        return local
    return installed if (installed / WEIGHTS_FILE).is_file() else local


def split_entries(values: Iterable[str]) -> list[str]:
    """``--weights`` values (each possibly several entries joined by :data:`SEPARATOR`) -> entries."""
    return [part.strip() for value in values for part in str(value).split(SEPARATOR) if part.strip()]


def check_entry(entry: str) -> None:
    """ValueError unless ``entry`` is ``PATH`` or ``NAME=PATH`` with a usable name."""
    name, _, path = entry.partition("=") if "=" in entry else ("", "", entry)
    if "=" in entry and not NAME.fullmatch(name):
        raise ValueError(
            f"{entry!r}: the name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a"
            " letter or digit"
        )
    if not path:
        raise ValueError(f"{entry!r}: no checkpoint path")


def _is_checkpoint(path: Path) -> bool:
    return path.suffix == ".safetensors" or (path / WEIGHTS_FILE).is_file()


def _resolve(path: Path) -> Path:
    if not path.exists() and str(path) in SHIPPED:
        return shipped_weights(str(path))
    return path


def _default_name(path: Path) -> str:
    folder = path.parent if path.suffix == ".safetensors" else path
    name = folder.resolve().name if folder.name in ("", ".", "..") else folder.name
    return name if NAME.fullmatch(name) else re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:64] or "model"


def model_specs(entries: Iterable[str]) -> list[ModelSpec]:
    """The models to serve, in order (the first is the default); ValueError for a bad or ambiguous entry.

    A path that does not exist is kept, so that loading it fails with the checkpoint's own error.
    """
    specs: list[ModelSpec] = []
    for entry in split_entries(entries):
        try:
            check_entry(entry)
        except ValueError as exc:
            raise ValueError(f"--weights {exc}") from None
        name, _, text = entry.partition("=") if "=" in entry else ("", "", entry)
        path = _resolve(Path(text))
        children = (
            sorted(child for child in path.iterdir() if child.is_dir() and _is_checkpoint(child))
            if path.is_dir() and not _is_checkpoint(path)
            else []
        )
        if children and name:
            raise ValueError(f"--weights {entry!r}: {path} holds several checkpoints; name each one (NAME=PATH)")
        specs.extend(ModelSpec(_default_name(child), child) for child in children)
        if not children:
            specs.append(ModelSpec(name or _default_name(path), path))
    if not specs:
        raise ValueError("--weights: no checkpoint given")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"--weights: more than one model named {', '.join(duplicates)}; name them (NAME=PATH)")
    return specs
