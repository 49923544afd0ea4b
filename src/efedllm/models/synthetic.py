"""Random-weight models built offline from a config: tiny ones for tests, real shapes for benchmarks.

Nothing is downloaded. ``write_checkpoint`` builds transformers' own model for a config, draws
every parameter at random (norm weights too, so that a norm of the wrong kind shows) and saves a
Hugging Face directory (safetensors, config, and a tokenizer). ``write_gguf`` writes that
directory as a GGUF file the way llama.cpp's converter does: its tensor names, its conversions
(the family's ``to_gguf_tensor`` and ``to_gguf_composites``), its metadata keys, float32 tensors,
and the tokenizer as llama.cpp's ``gpt2`` metadata.

The tokenizer of tiny models is the default model's byte-level BPE cut to its first
``TINY_VOCAB`` tokens (and the merges among them): a 49k-token vocabulary would make the
embedding the biggest tensor and every GGUF metadata parse take seconds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from efedllm.models.families import family_for
from efedllm.models.sources import resolve_model
from efedllm.models.weights import load_tokenizer

DEFAULT_MODEL = "smollm2-135m"  # whose tokenizer the synthetic models use
TINY_VOCAB = 1024
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_hidden_layers": 8, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
# what each family's tiny model adds; sliding windows of 8 so that tests' sequences cross them
TINY_EXTRAS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 128},  # transformers reads a qwen3 GGUF without its key_length: head_dim stays 128
    "mistral": {"sliding_window": 8},
    "gemma3_text": {"sliding_window": 8},  # layers 0-4 and 6-7 slide, layer 5 is global (the pattern of 6)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
}
GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                     "mixtral": "llama"}


def tiny_config(model_type: str, **overrides):
    """A small config of ``model_type`` (the tiny tokenizer's vocabulary, 8 layers, hidden 64)."""
    settings = {"vocab_size": TINY_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                **TINY_SHAPE, **TINY_EXTRAS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **settings)


@functools.cache
def _tiny_tokenizer_spec(size: int) -> str:
    """The default tokenizer's ``tokenizer.json`` cut to ids below ``size`` and the merges that stay inside them."""
    spec = json.loads(load_tokenizer(resolve_model(DEFAULT_MODEL)).backend_tokenizer.to_str())
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < size}
    pairs = [merge if isinstance(merge, list) else merge.split(" ") for merge in spec["model"]["merges"]]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [pair for pair in pairs if pair[0] in vocab and pair[1] in vocab and "".join(pair) in vocab]
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < size]
    return json.dumps(spec)


def tiny_tokenizer(size: int = 0):
    """A fast tokenizer of the first ``size`` (default ``TINY_VOCAB``) tokens, with the default model's chat template."""
    base = load_tokenizer(resolve_model(DEFAULT_MODEL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_spec(size or TINY_VOCAB)),
                                        bos_token=base.bos_token, eos_token=base.eos_token, unk_token=base.unk_token,
                                        pad_token=base.pad_token)
    tokenizer.chat_template = base.chat_template
    return tokenizer


@torch.no_grad()
def write_checkpoint(config, directory: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A random model of ``config`` saved as a Hugging Face directory (see the module docstring)."""
    directory = Path(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    tiny_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name).float().numpy() for name in handle.keys()})
    return tensors


def gguf_names(family, config) -> dict[str, str]:
    """Hugging Face checkpoint name -> llama.cpp's GGUF name, for every tensor of the model."""
    names = {family.hf_embedding: family.gguf_embedding, family.hf_final_norm: family.gguf_final_norm}
    if not getattr(config, "tie_word_embeddings", False):
        names[family.hf_lm_head] = family.gguf_lm_head
    for block in range(config.num_hidden_layers):
        for suffix, parameter in family.layer_tensors.items():
            names[f"{family.hf_layer_prefix}{block}.{parameter}"] = f"blk.{block}.{suffix}"
    return names


def write_gguf(directory: Path, path: Path) -> Path:
    """The Hugging Face directory ``directory`` as a float32 GGUF file at ``path`` (module docstring)."""
    config = AutoConfig.from_pretrained(directory)
    family = family_for(config.model_type)
    tensors = hf_tensors(directory)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURE[config.model_type])
    _write_metadata(writer, config)
    arrays = {gguf_name: family.to_gguf_tensor(tensors[hf_name], gguf_name, config)
              for hf_name, gguf_name in gguf_names(family, config).items()}
    for block in range(config.num_hidden_layers):
        prefix = f"{family.hf_layer_prefix}{block}."
        block_tensors = {name[len(prefix):]: array for name, array in tensors.items() if name.startswith(prefix)}
        arrays.update({f"blk.{block}.{suffix}": array for suffix, array in family.to_gguf_composites(config, block_tensors).items()})
    for gguf_name, array in arrays.items():
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:
        parameters = parameters["full_attention"]
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_metadata(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name("efedllm synthetic")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if GGUF_ARCHITECTURE[config.model_type] == "llama":
        writer.add_rope_dimension_count(head_dim)
    if config.model_type == "gemma3_text":
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "num_local_experts", None):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    _write_tokenizer(writer, tiny_tokenizer(config.vocab_size))


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """``tokenizer`` (byte-level BPE) as llama.cpp's ``gpt2`` tokenizer metadata, as the default model's file has it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    special = {token["id"] for token in spec["added_tokens"] if token.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
                            for index in range(len(tokens))])
    writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(tokenizer, f"{token}_token") is not None:
            add(tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{token}_token")))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(tokenizer.chat_template)
