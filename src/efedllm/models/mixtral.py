"""The Mixtral family: Mistral's attention with a mixture-of-experts MLP, routed inside the span.

transformers keeps a layer's experts fused (``mlp.experts.gate_up_proj`` [E, 2·I, H] and
``mlp.experts.down_proj`` [E, H, I], the router ``mlp.gate.weight`` [E, H]); checkpoints store
them per expert (``block_sparse_moe.experts.{e}.w1/w3/w2``, ``block_sparse_moe.gate``) and
llama.cpp stacked (``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H], ``ffn_down_exps`` [E, H, I],
``ffn_gate_inp`` [E, H]) in a ``llama`` GGUF file with an expert count, which transformers cannot
read (:func:`efedllm.models.weights.load_config` does). The composite tensors say where each stored
tensor goes in the fused ones, so a loader fills them one stored tensor at a time.
"""

from __future__ import annotations

import numpy as np
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from efedllm.models.family import CompositeTensor, ModelFamily, sliding_everywhere
from efedllm.models.llama import LLAMA_LAYER_TENSORS, fix_llama_gguf_tensor, llama_to_gguf_tensor

ATTENTION_TENSORS = {gguf: hf for gguf, hf in LLAMA_LAYER_TENSORS.items() if not gguf.startswith("ffn_") or gguf == "ffn_norm.weight"}
ATTENTION_STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))


def mixtral_composites(config, gguf: bool) -> dict[str, CompositeTensor]:
    """The fused experts and the router of one block, from the tensors a checkpoint or a GGUF file holds."""
    experts, hidden, intermediate = config.num_local_experts, config.hidden_size, config.intermediate_size
    gate, up = slice(0, intermediate), slice(intermediate, 2 * intermediate)
    shapes = {"mlp.experts.gate_up_proj": (experts, 2 * intermediate, hidden), "mlp.experts.down_proj": (experts, hidden, intermediate),
              "mlp.gate.weight": (experts, hidden)}
    if gguf:  # llama.cpp stacks the experts: [E, I, H] gate and up, [E, H, I] down
        parts = {"mlp.experts.gate_up_proj": (("ffn_gate_exps.weight", (slice(None), gate)), ("ffn_up_exps.weight", (slice(None), up))),
                 "mlp.experts.down_proj": (("ffn_down_exps.weight", ()),),
                 "mlp.gate.weight": (("ffn_gate_inp.weight", ()),)}
    else:  # one tensor per expert: w1 (gate) and w3 (up) [I, H], w2 (down) [H, I]
        stored = "block_sparse_moe.experts.{}.{}.weight"
        parts = {"mlp.experts.gate_up_proj": tuple((stored.format(e, "w1"), (e, gate)) for e in range(experts))
                 + tuple((stored.format(e, "w3"), (e, up)) for e in range(experts)),
                 "mlp.experts.down_proj": tuple((stored.format(e, "w2"), (e,)) for e in range(experts)),
                 "mlp.gate.weight": (("block_sparse_moe.gate.weight", ()),)}
    return {name: CompositeTensor(shapes[name], parts[name]) for name in shapes}


def mixtral_to_gguf(config, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp's stacked expert tensors of one block from its checkpoint tensors (suffix -> array)."""
    def stacked(kind: str) -> np.ndarray:
        return np.stack([tensors[f"block_sparse_moe.experts.{e}.{kind}.weight"] for e in range(config.num_local_experts)])

    return {"ffn_gate_exps.weight": stacked("w1"), "ffn_up_exps.weight": stacked("w3"),
            "ffn_down_exps.weight": stacked("w2"), "ffn_gate_inp.weight": tensors["block_sparse_moe.gate.weight"]}


def mixtral_family() -> ModelFamily:
    return ModelFamily(
        model_type="mixtral",
        config_class=MixtralConfig,
        decoder_layer_class=MixtralDecoderLayer,
        rotary_class=MixtralRotaryEmbedding,
        norm_class=MixtralRMSNorm,
        layer_tensors=ATTENTION_TENSORS,
        gguf_architectures=("llama",),
        layer_types=sliding_everywhere,
        projection_stages=ATTENTION_STAGES,  # the experts are fused parameters, not nn.Linear: kept dense
        fix_gguf_tensor=fix_llama_gguf_tensor,
        to_gguf_tensor=llama_to_gguf_tensor,
        composite_tensors=mixtral_composites,
        to_gguf_composites=mixtral_to_gguf,
    )
