"""A span of transformer blocks, loaded alone, and the client's own parts of the model.

``load_span`` materialises only blocks ``start..end-1``: decoder layers are built on the meta
device (no memory) and filled with ``assign=True`` from tensors read one at a time, so the only
weights a process ever holds are its own span's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from efedllm.common.dtypes import parse_dtype
from efedllm.common.spans import Span
from efedllm.models.batching import RaggedCache, RaggedPart, part_lengths, ragged_mask, ragged_positions
from efedllm.models.family import SLIDING, ModelFamily
from efedllm.models.progress import loading_progress
from efedllm.models.quantization import Int8Experts, parse_quantization, quantized_shell, unloaded_tensors
from efedllm.models.sources import resolve_model
from efedllm.models.weights import load_tokenizer, open_model


class SpanModel(nn.Module):
    """Blocks ``span.start..span.end-1`` of a model, run on hidden states.

    Layer ``i`` of ``layers`` is block ``span.start + i``; it is built from the family's span
    config with local index ``i`` (so its attention writes to cache layer ``i`` and its attention
    kind is that of block ``span.start + i``); a KV cache for a span has ``span.length`` layers.
    """

    def __init__(self, config, family: ModelFamily, span: Span, layers: nn.ModuleList, rotary: nn.Module) -> None:
        super().__init__()
        self.config, self.family, self.span = config, family, span
        self.layers, self.rotary_emb = layers, rotary
        self.span_config = family.span_config(config, span.start, span.end)
        self.layer_types: list[str] = list(self.span_config.layer_types)  # local index -> attention kind

    @property
    def dtype(self) -> torch.dtype:
        return next(self.layers.parameters()).dtype

    def kv_bytes_per_token(self, blocks: Span | None = None) -> int:
        """Bytes of KV cache one token of one batch row takes in ``blocks`` (default: the whole span)."""
        config = self.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * heads * head_dim * element * (blocks or self.span).length  # keys and values

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        position: int = 0,
        cache=None,
        blocks: Span | None = None,
        layer_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden_states`` [batch, tokens, hidden] through ``blocks`` (default: the whole span).

        ``position`` is the index of the first token (what the cache already holds). Without a
        cache the sequence is processed causally on its own. ``layer_prompts`` [layers of blocks,
        prompts, hidden] (deep prompt tuning, :mod:`efedllm.models.adapters`) are added to the first
        ``prompts`` positions' hidden states before each layer.
        """
        blocks = blocks or self.span
        first, last = blocks.start - self.span.start, blocks.end - self.span.start
        tokens = hidden_states.shape[1]
        position_ids = torch.arange(position, position + tokens, device=hidden_states.device).unsqueeze(0)
        kinds = self._kinds(first, last)
        masks = {kind: self._mask(kind, hidden_states, cache, position_ids, index) for kind, index in kinds.items()}
        return self._run_layers(hidden_states, position_ids, masks, cache, first, last, layer_prompts)

    def forward_ragged(self, hidden_states: torch.Tensor, parts: list[RaggedPart], blocks: Span | None = None) -> torch.Tensor:
        """Several sessions' steps at once (:mod:`efedllm.models.batching`): ``hidden_states`` [rows, tokens,
        hidden] stacks the ``parts``' rows in order, each part at its own cached length; every part's cache
        gains the step's keys and values, as ``forward`` with that part's cache alone would."""
        blocks = blocks or self.span
        first, last = blocks.start - self.span.start, blocks.end - self.span.start
        tokens = hidden_states.shape[1]
        lengths = part_lengths(parts)  # [rows]
        window = getattr(self.span_config, "sliding_window", None)
        masks = {kind: ragged_mask(lengths, tokens, kind, window) for kind in self._kinds(first, last)}
        return self._run_layers(hidden_states, ragged_positions(lengths, tokens), masks, RaggedCache(parts, tokens), first, last)

    def _kinds(self, first: int, last: int) -> dict[str, int]:
        """Attention kind -> the first local layer of that kind among layers ``first..last-1``."""
        return {kind: self.layer_types.index(kind, first, last) for kind in dict.fromkeys(self.layer_types[first:last])}

    def _run_layers(self, hidden_states, position_ids, masks: dict, cache, first: int, last: int,
                    layer_prompts: torch.Tensor | None = None) -> torch.Tensor:
        # (cos, sin) [1 or rows, tokens, head_dim] per attention kind (Gemma 3's two rotary bases)
        embeddings = {kind: self.family.position_embeddings(self.rotary_emb, hidden_states, position_ids, kind)
                      for kind in masks}
        for index in range(first, last):
            kind = self.layer_types[index]
            if layer_prompts is not None:  # out of place: autograd needs the layer's input as it was
                prompts = layer_prompts[index - first]  # [prompts, hidden]
                hidden_states = torch.cat([hidden_states[:, :prompts.shape[0]] + prompts, hidden_states[:, prompts.shape[0]:]], dim=1)
            hidden_states = self.layers[index](
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=embeddings[kind],
            )
        return hidden_states

    def _mask(self, kind: str, hidden_states, cache, position_ids, layer_index: int):
        """The attention mask of one kind; ``layer_index``: a layer of that kind, whose cache sizes the mask."""
        build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        return build(config=self.span_config, inputs_embeds=hidden_states, attention_mask=None, cache=cache,
                     position_ids=position_ids, layer_idx=layer_index if cache is not None else None)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.family.cache_config(self.span_config))


def _prepare_config(config) -> None:
    config._attn_implementation = "sdpa"  # the same kernel transformers' own models use by default


def _open_span(model: str, start: int, end: int):
    """(source, config, family, reader, span, span config) for blocks ``start..end-1``; ValueError past the end."""
    source = resolve_model(model)
    config, family, reader = open_model(source)
    _prepare_config(config)
    span = Span(start, end)
    if end > config.num_hidden_layers:
        raise ValueError(f"span {span} exceeds the model's {config.num_hidden_layers} blocks")
    return source, config, family, reader, span, family.span_config(config, start, end)


def _finish(config, family: ModelFamily, span: Span, layers: nn.ModuleList) -> SpanModel:
    span_model = SpanModel(config, family, span, layers, family.rotary_class(config=config)).eval()
    span_model.requires_grad_(False)
    return span_model


def fill_composite_part(layer: nn.Module, name: str, part, dtype: torch.dtype) -> None:
    """Copy one stored part (a ``StoredPart`` with its composite and index) into parameter ``name`` of
    ``layer``: allocated on the first part, quantised on arrival when the owner is an int8 module."""
    owner_name, _, attribute = name.rpartition(".")
    owner = layer.get_submodule(owner_name)
    if isinstance(owner, Int8Experts):
        owner.load_part(attribute, part.index, part.tensor)
        return
    current = getattr(owner, attribute)
    if tuple(current.shape) != tuple(part.composite.shape):
        raise ValueError(f"{name}: the layer expects shape {tuple(current.shape)}, the checkpoint builds {part.composite.shape}")
    if current.is_meta:
        current = nn.Parameter(torch.empty(part.composite.shape, dtype=dtype), requires_grad=False)
        setattr(owner, attribute, current)
    target = current.data[part.index]
    if tuple(target.shape) != tuple(part.tensor.shape):
        raise ValueError(f"{name}: a stored part of shape {tuple(part.tensor.shape)} does not fit {tuple(target.shape)}")
    target.copy_(part.tensor)


def load_span(model: str, start: int, end: int, dtype: str | torch.dtype = torch.float32,
              quant: str | None = None) -> SpanModel:
    """Load blocks ``start..end-1`` of ``model`` (alias, GGUF path or HF directory), nothing else.

    Tensors arrive one at a time and go straight into their layer (quantised on arrival with
    ``quant="int8"``, :mod:`~efedllm.models.quantization`), so a load holds the span plus one tensor."""
    dtype, quant = parse_dtype(dtype), parse_quantization(quant)
    source, config, family, reader, span, span_config = _open_span(model, start, end)
    layers = nn.ModuleList()
    for local_index, block in enumerate(loading_progress(range(start, end), f"blocks {span} of {source.name}")):
        with torch.device("meta"):
            layer = quantized_shell(family.decoder_layer_class(span_config, local_index), quant)
        for name, part in reader.iter_layer(block, dtype):
            if part.composite is not None:
                fill_composite_part(layer, name, part, dtype)
            elif layer.load_state_dict({name: part.tensor}, strict=False, assign=True).unexpected_keys:
                raise ValueError(f"block {block} of {source.name}: unexpected tensor {name}")
            del part
        if missing := unloaded_tensors(layer):
            raise ValueError(f"block {block} of {source.name}: tensors {missing[:4]} are missing from the checkpoint")
        layers.append(layer)
    return _finish(config, family, span, layers)


def empty_span(model: str, start: int, end: int) -> SpanModel:
    """Blocks ``start..end-1`` of ``model``'s architecture with parameters on the meta device (no memory).

    For weights that arrive from elsewhere (a peer's ``--weights-from`` transfer): fill them with
    ``load_state_dict(..., assign=True)``. Only the model's config is read.
    """
    _, config, family, _, span, span_config = _open_span(model, start, end)
    with torch.device("meta"):
        layers = nn.ModuleList(family.decoder_layer_class(span_config, local_index) for local_index in range(span.length))
    return _finish(config, family, span, layers)


class ClientParts(nn.Module):
    """What a client owns: tokenizer, token embeddings, final norm and LM head."""

    def __init__(self, config, tokenizer, embedding: nn.Embedding, norm: nn.Module, lm_head_weight: torch.Tensor,
                 embedding_scale: float = 1.0, logit_softcap: float | None = None) -> None:
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        self.embedding, self.norm = embedding, norm
        self.lm_head_weight = nn.Parameter(lm_head_weight, requires_grad=False)
        self.embedding_scale, self.logit_softcap = embedding_scale, logit_softcap

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(input_ids)  # [batch, tokens] -> [batch, tokens, hidden]
        if self.embedding_scale == 1.0:
            return embedded
        return embedded * torch.tensor(self.embedding_scale).to(embedded.dtype)  # rounded as transformers rounds it

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [batch, tokens, hidden] -> [batch, tokens, vocab], computed in float32 for stable sampling
        logits = nn.functional.linear(self.norm(hidden_states), self.lm_head_weight).float()
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap


def load_client_parts(model: str, dtype: str | torch.dtype = torch.float32) -> ClientParts:
    """Load only the tokenizer, the embeddings, the final norm and the LM head of ``model``."""
    dtype = parse_dtype(dtype)
    source = resolve_model(model)
    config, family, reader = open_model(source)
    _prepare_config(config)
    tokenizer = load_tokenizer(source)
    gguf = source.kind.value == "gguf"
    names = {
        "embedding": family.gguf_embedding if gguf else family.hf_embedding,
        "norm": family.gguf_final_norm if gguf else family.hf_final_norm,
        "lm_head": family.gguf_lm_head if gguf else family.hf_lm_head,
    }
    if names["lm_head"] not in reader.available() or getattr(config, "tie_word_embeddings", False):
        names.pop("lm_head")
    tensors = reader.read(list(loading_progress(names.values(), f"client parts of {source.name}")), dtype)
    embedding = nn.Embedding.from_pretrained(tensors[names["embedding"]], freeze=True)
    with torch.device("meta"):
        norm = family.norm_class(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": tensors[names["norm"]]}, assign=True)
    lm_head = tensors[names["lm_head"]] if "lm_head" in names else embedding.weight
    return ClientParts(config, tokenizer, embedding, norm, lm_head, family.embedding_scale(config),
                       family.logit_softcap(config)).eval().requires_grad_(False)
