"""A Hugging Face model directory as the converter reads it: config, weights, sentence-transformers pooling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import PoolingType

from daemon.errors import InvalidModelFile

# sentence-transformers' pooling modes that llama.cpp's pooling types run as they do.
_POOLING_MODES = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "lasttoken": PoolingType.LAST}
# The sentence-transformers modules llama.cpp's graph stands for (the model, its pooling) or that
# change nothing emberd returns (emberd normalises vectors itself). Any other module (a Dense
# projection, say) would be left out, and the vectors would silently differ.
_RUNNABLE_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class HFSource:
    path: Path
    config: dict[str, Any]
    weights: list[Path]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def architectures(self) -> set[str]:
        return set(self.config.get("architectures") or [])

    def int_setting(self, key: str) -> int:
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidModelFile(f"{self.name}: config.json lacks {key}")
        return value

    def json_file(self, filename: str) -> dict[str, Any] | None:
        path = self.path / filename
        return read_json(path) if path.is_file() else None


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidModelFile(f"cannot read {path.name}: {error}") from None
    if not isinstance(value, dict):
        raise InvalidModelFile(f"{path.name} is not a JSON object")
    return value


def read_source(directory: Path) -> HFSource:
    """config.json and the .safetensors weights (never a pickle: .bin files are not read)."""
    if not (directory / "config.json").is_file():
        raise InvalidModelFile(f"{directory} has no config.json: not a Hugging Face model directory")
    config = read_json(directory / "config.json")
    return HFSource(directory, config, sorted(directory.glob("*.safetensors")))


def require_weights(source: HFSource) -> None:
    if not source.weights:
        raise InvalidModelFile(f"{source.name}: no .safetensors weights (emberd never reads pickled .bin files)")


def _pooling_directory(directory: Path) -> Path | None:
    modules_json = directory / "modules.json"
    if not modules_json.is_file():
        default = directory / "1_Pooling"
        return default if default.is_dir() else None
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidModelFile(f"cannot read modules.json: {error}") from None
    if not isinstance(modules, list):
        raise InvalidModelFile("modules.json is not a list")
    pooling = None
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if not kind.endswith(_RUNNABLE_MODULES):
            raise InvalidModelFile(
                f"{directory.name}: sentence-transformers module {kind or module!r} cannot run in llama.cpp "
                f"(emberd converts models made of {', '.join(_RUNNABLE_MODULES)} modules)"
            )
        if kind.endswith("Pooling"):
            pooling = directory / str(module.get("path", ""))
    return pooling


def read_pooling(directory: Path) -> PoolingType | None:
    """The pooling the folder's sentence-transformers configuration asks for; None without one."""
    pooling_directory = _pooling_directory(directory)
    if pooling_directory is None or not (pooling_directory / "config.json").is_file():
        return None
    config = read_json(pooling_directory / "config.json")
    mode = config.get("pooling_mode")  # sentence-transformers 6 names the mode
    if isinstance(mode, str):
        if mode in _POOLING_MODES:
            return _POOLING_MODES[mode]
    else:  # earlier versions set one flag of several
        flags = {
            "mean": config.get("pooling_mode_mean_tokens"),
            "cls": config.get("pooling_mode_cls_token"),
            "lasttoken": config.get("pooling_mode_lasttoken"),
        }
        chosen = [name for name, flag in flags.items() if flag]
        others = [key for key, flag in config.items() if key.startswith("pooling_mode_") and flag is True]
        if len(chosen) == 1 and len(others) == 1:
            return _POOLING_MODES[chosen[0]]
        mode = ", ".join(others) or "none"
    raise InvalidModelFile(
        f"{directory.name}: pooling {mode!r} in {pooling_directory.name}/config.json is not supported by llama.cpp"
        " (it runs mean, cls and lasttoken pooling)"
    )
