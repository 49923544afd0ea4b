"""Reading a model's config, tokenizer and tensors, one tensor at a time.

GGUF files are read with gguf's memory-mapped reader and only the requested tensors are
dequantised, so a process that hosts k of L blocks touches about k/L of the block weights.
Safetensors checkpoints are read with ``safe_open`` the same way. Configs and tokenizers derived
from a GGUF file are cached on disk (building a tokenizer from GGUF metadata takes seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, MixtralConfig

from efedllm.models.families import family_for
from efedllm.models.family import CompositeTensor, ModelFamily
from efedllm.models.sources import ModelSource, SourceKind, cache_directory, resolve_model


def _cached(source: ModelSource, what: str) -> Path:
    return cache_directory() / source.cache_key() / what


def _publish_atomically(build, target: Path) -> None:
    """Build a cache entry in a temporary folder and rename it into place (safe under concurrency)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_file(text: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, target)


def _build_gguf_index(path: Path) -> dict[str, dict]:
    reader = GGUFReader(path)
    return {
        tensor.name: {
            "type": int(tensor.tensor_type),
            "offset": int(tensor.data_offset),
            "shape": [int(size) for size in tensor.data.shape],
            "dtype": str(tensor.data.dtype),
        }
        for tensor in reader.tensors
    }


def load_config(source: ModelSource):
    """The transformers config of the whole model (cached for GGUF files)."""
    if source.kind is SourceKind.HF_DIRECTORY:
        return AutoConfig.from_pretrained(source.path)
    cached = _cached(source, "config")
    if not (cached / "config.json").is_file():
        config = _mixture_of_experts(AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name), source.path)
        _publish_atomically(config.save_pretrained, cached)
    config = AutoConfig.from_pretrained(cached)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised on load; nothing stays quantised
    return config


def _mixture_of_experts(config, path: Path):
    """llama.cpp writes Mixtral as a ``llama`` GGUF file with an expert count, which transformers' GGUF config
    drops: such a file is a Mixtral (no sliding window: llama.cpp's files carry none)."""
    if config.model_type != "llama":
        return config
    fields = GGUFReader(path).fields  # parsed once: parsing a file's metadata costs ~160 MB
    field = fields.get("llama.expert_count")
    if field is None or int(field.contents()) == 0:
        return config
    used = fields["llama.expert_used_count"].contents()
    settings = {key: value for key, value in config.to_dict().items() if key not in ("model_type", "architectures")}
    return MixtralConfig(**{**settings, "num_local_experts": int(field.contents()), "num_experts_per_tok": int(used),
                            "sliding_window": None, "architectures": ["MixtralForCausalLM"]})


def model_blocks(model: str) -> int:
    """How many transformer blocks ``model`` (an alias, a GGUF file or an HF directory) has; reads only its config."""
    return load_config(resolve_model(model)).num_hidden_layers


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, chat template included (cached for GGUF files)."""
    if source.kind is SourceKind.HF_DIRECTORY:
        return AutoTokenizer.from_pretrained(source.path)
    cached = _cached(source, "tokenizer")
    if not (cached / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        _publish_atomically(tokenizer.save_pretrained, cached)
    return AutoTokenizer.from_pretrained(cached)


@dataclass(frozen=True)
class StoredPart:
    """One stored tensor of a block: a whole parameter, or (``composite`` set) the part of one at ``index``."""

    tensor: torch.Tensor
    composite: CompositeTensor | None = None
    index: tuple = ()


class TensorReader:
    """Reads named tensors (Hugging Face names) from a GGUF file or a safetensors checkpoint."""

    def __init__(self, source: ModelSource, config, family: ModelFamily) -> None:
        self.source, self.config, self.family = source, config, family

    def layer_names(self, layer_index: int) -> dict[str, str]:
        """Parameter name inside a decoder layer -> checkpoint name, for one block."""
        if self.source.kind is SourceKind.GGUF:
            return {hf: f"blk.{layer_index}.{gguf}" for gguf, hf in self.family.layer_tensors.items()}
        prefix = f"{self.family.hf_layer_prefix}{layer_index}."
        return {hf: prefix + hf for hf in self.family.layer_tensors.values()}

    def read_layer(self, layer_index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One block's parameters by their names inside a decoder layer, composite ones assembled."""
        result = {}
        for param, part in self.iter_layer(layer_index, dtype):
            if part.composite is None:
                result[param] = part.tensor
            else:
                result.setdefault(param, torch.empty(part.composite.shape, dtype=dtype))[part.index] = part.tensor
        return result

    def iter_layer(self, layer_index: int, dtype: torch.dtype) -> Iterator[tuple[str, StoredPart]]:
        """One block's stored tensors, one at a time, each with the parameter it fills: the plain ones
        as they are, then the parts of the family's composite ones (a Mixtral layer's fused experts)."""
        for param, name in self.layer_names(layer_index).items():
            yield param, StoredPart(self.read([name], dtype)[name])
        gguf = self.source.kind is SourceKind.GGUF
        prefix = f"blk.{layer_index}." if gguf else f"{self.family.hf_layer_prefix}{layer_index}."
        for param, composite in self.family.composite_tensors(self.config, gguf).items():
            for suffix, index in composite.parts:
                yield param, StoredPart(self.read([prefix + suffix], dtype)[prefix + suffix], composite, index)

    def available(self) -> set[str]:
        if self.source.kind is SourceKind.GGUF:
            return set(self._gguf_index())
        return set(self._safetensors_index())

    def read(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        names = list(names)
        if self.source.kind is SourceKind.GGUF:
            return self._read_gguf(names, dtype)
        return self._read_safetensors(names, dtype)

    def _gguf_index(self) -> dict[str, dict]:
        """Tensor name -> where its bytes lie in the file (cached: parsing all GGUF metadata costs ~160 MB)."""
        if not hasattr(self, "_index_gguf"):
            cached = _cached(self.source, "gguf-tensors.json")
            if not cached.is_file():
                _publish_file(json.dumps(_build_gguf_index(self.source.path)), cached)
            self._index_gguf = json.loads(cached.read_text())
        return self._index_gguf

    def _read_gguf(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        index, result = self._gguf_index(), {}
        for name in names:
            if name not in index:
                raise KeyError(f"tensor {name!r} is not in {self.source.path}")
            entry = index[name]
            raw = self._read_gguf_bytes(entry)
            array = dequantize(raw, GGMLQuantizationType(entry["type"]))  # float32 [rows, cols]
            array = self.family.fix_gguf_tensor(array, name, self.config)
            result[name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).to(dtype)
            del raw
        return result

    def _read_gguf_bytes(self, entry: dict) -> np.ndarray:
        """A tensor's stored bytes, read (not memory-mapped: mapped pages would stay in this process's RSS
        until the map is collected, ~40 MB for 10 SmolLM2 blocks)."""
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        with open(self.source.path, "rb") as handle:
            handle.seek(entry["offset"])
            data = handle.read(int(np.prod(shape)) * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def _safetensors_index(self) -> dict[str, Path]:
        if not hasattr(self, "_index"):
            self._index = {}
            for file in sorted(self.source.path.glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self._index.update({key: file for key in handle.keys()})
        return self._index

    def _read_safetensors(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        index, result = self._safetensors_index(), {}
        for file in sorted({index[name] for name in names if name in index}):
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    if index.get(name) == file:
                        result[name] = handle.get_tensor(name).to(dtype)
        missing = [name for name in names if name not in result]
        if missing:
            raise KeyError(f"tensors {missing[:3]} are not in {self.source.path}")
        return result


def open_model(source: ModelSource):
    """Config, family and a tensor reader for a resolved model."""
    config = load_config(source)
    family = family_for(config.model_type)
    return config, family, TensorReader(source, config, family)

