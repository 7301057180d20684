"""The one place where model-family differences live.

Every supported family has the same decoder skeleton in transformers:
``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``, with
attention that reads its head counts from the projection widths through ``head_dim``. That covers
Llama (incl. Llama-3.x and SmolLM2), SmolLM3, Mistral, Ministral, Qwen2/2.5, Qwen3, Gemma,
Gemma 2, Gemma 3 (text), Granite, OLMo, Helium, EXAONE 4, Seed-OSS and ERNIE 4.5. What differs is
recorded in a :class:`FamilySpec`: which transformers modules hold the config and model classes
(needed to write reloadable remote code). Biases (Qwen2, Seed-OSS, Llama with attention_bias) are
found on the modules themselves; per-head q/k norms (Qwen3, Gemma 3, EXAONE 4) act on head_dim and
are shared across heads, so they are never sliced. Families whose norms span all heads (OLMo 2/3,
Cohere and StableLM with qk-norm) or whose projections are fused (Phi-3, GLM) are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import AdaptEngineError

# The per-layer width keys of a pruned model's config.json are owned by the remote module: it is copied
# next to saved models and must stay standalone.
from .remote.adapt_pruned_shapes import LAYER_HEADS_KEY, LAYER_KV_HEADS_KEY, LAYER_MLP_KEY, NoAttention


class UnsupportedModelError(AdaptEngineError, ValueError):
    """Raised for a model whose family the engine cannot prune."""


@dataclass(frozen=True)
class FamilySpec:
    """What the engine needs to know about one model family."""

    model_type: str
    config_module: str
    config_class: str
    modeling_module: str
    causal_lm_class: str


# (model_type, transformers.models.<module>, class-name prefix): config class <prefix>Config and
# model class <prefix>ForCausalLM, except where a config class is named explicitly.
_FAMILY_TABLE = (
    ("llama", "llama", "Llama"), ("mistral", "mistral", "Mistral"), ("ministral", "ministral", "Ministral"),
    ("qwen2", "qwen2", "Qwen2"), ("qwen3", "qwen3", "Qwen3"), ("gemma", "gemma", "Gemma"),
    ("gemma2", "gemma2", "Gemma2"), ("gemma3_text", "gemma3", "Gemma3", "Gemma3TextConfig"),
    ("granite", "granite", "Granite"), ("olmo", "olmo", "Olmo"), ("smollm3", "smollm3", "SmolLM3"),
    ("helium", "helium", "Helium"), ("exaone4", "exaone4", "Exaone4"), ("seed_oss", "seed_oss", "SeedOss"),
    ("ernie4_5", "ernie4_5", "Ernie4_5"),
)


def _spec(model_type: str, module: str, prefix: str, config_class: str | None = None) -> FamilySpec:
    base = f"transformers.models.{module}"
    return FamilySpec(model_type, f"{base}.configuration_{module}", config_class or f"{prefix}Config",
                      f"{base}.modeling_{module}", f"{prefix}ForCausalLM")


FAMILIES: dict[str, FamilySpec] = {row[0]: _spec(*row) for row in _FAMILY_TABLE}

# Families that multiply the embedding output by sqrt(hidden_size) (a buffer rebuilt from the config on reload)
# and whose RMSNorms scale by (1 + w): stem pruning folds the changed scale into the weights (keep_embedding_scale).
_SQRT_HIDDEN_EMBEDDING = {"gemma", "gemma2", "gemma3_text"}
# Families whose config refuses a hidden_size that is not a multiple of num_attention_heads (transformers' strict
# config validation), although head_dim is explicit: stem pruning keeps such multiples (hidden_multiple).
_HIDDEN_DIVISIBLE_BY_HEADS = {"llama", "gemma2", "gemma3_text"}

PRUNED_PREFIX = "adapt_pruned_"


def base_model_type(config) -> str:
    """The family name of a config, seeing through our ``adapt_pruned_<family>`` wrapper."""
    model_type = getattr(config, "model_type", "")
    if model_type.startswith(PRUNED_PREFIX):
        return model_type[len(PRUNED_PREFIX):]
    return getattr(config, "adapt_base_model_type", None) or model_type


def family_of(config) -> FamilySpec:
    """The :class:`FamilySpec` of a config, or a clear error naming the supported families."""
    model_type = base_model_type(config)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; adapt-engine prunes these decoder families: "
            f"{', '.join(sorted(FAMILIES))}. Convert the model to one of them or open an issue."
        )
    return FAMILIES[model_type]


@dataclass
class LayerShape:
    """Widths of one decoder layer."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


class DecoderAdapter:
    """Uniform access to the prunable parts of a supported causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.family = family_of(self.config)
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no 'model.layers'; pass a *ForCausalLM model of a supported family"
            )
        self.layers: list[nn.Module] = list(layers)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim

    @property
    def hidden_size(self) -> int:
        """The residual-stream width, from the config that every adapter of this model shares (stem pruning
        updates it)."""
        return self.config.hidden_size

    # -- module access -------------------------------------------------------------------------
    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        """The self-attention module of a decoder layer."""
        return layer.self_attn

    @staticmethod
    def attention_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q, k, v, o) projections of a layer."""
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    @staticmethod
    def mlp_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate, up, down) projections of a layer."""
        m = layer.mlp
        return m.gate_proj, m.up_proj, m.down_proj

    # -- shapes ---------------------------------------------------------------------------------
    def layer_shape(self, index: int) -> LayerShape:
        """Current widths of layer ``index``, read from the weights themselves."""
        layer = self.layers[index]
        q, k, _, _ = self.attention_projections(layer)
        gate, _, _ = self.mlp_projections(layer)
        return LayerShape(q.out_features // self.head_dim, k.out_features // self.head_dim, gate.out_features)

    def shapes(self) -> list[LayerShape]:
        """Widths of every layer."""
        return [self.layer_shape(i) for i in range(len(self.layers))]

    def sync_layer(self, index: int) -> None:
        """Make a layer's bookkeeping attributes agree with its (possibly pruned) weights."""
        layer = self.layers[index]
        shape = self.layer_shape(index)
        if shape.num_heads == 0 and not isinstance(layer.self_attn, NoAttention):
            # Every head is gone: the stock module cannot run 0 heads, NoAttention adds nothing instead.
            layer.self_attn = NoAttention.taking_over(layer.self_attn)
        attn = layer.self_attn
        q, k, v, o = self.attention_projections(layer)
        gate, up, down = self.mlp_projections(layer)
        if shape.num_heads:
            # Stock attention reshapes with head_dim and repeats KV by num_key_value_groups only.
            attn.num_key_value_groups = shape.num_heads // shape.num_kv_heads
            for name, value in (("num_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)):
                if hasattr(attn, name):  # older transformers releases keep these on the module
                    setattr(attn, name, value)
        for lin in (q, k, v, o, gate, up, down):
            lin.out_features, lin.in_features = lin.weight.shape
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = shape.intermediate_size

    def record_shapes(self) -> None:
        """Write per-layer widths into the config so that saving and reloading can rebuild them."""
        shapes = self.shapes()
        setattr(self.config, LAYER_HEADS_KEY, [s.num_heads for s in shapes])
        setattr(self.config, LAYER_KV_HEADS_KEY, [s.num_kv_heads for s in shapes])
        setattr(self.config, LAYER_MLP_KEY, [s.intermediate_size for s in shapes])
        self.config.adapt_base_model_type = self.family.model_type

    # -- hidden ("stem") channels -----------------------------------------------------------------
    def hidden_norms(self) -> list[nn.Module]:
        """Every norm over the hidden size: each layer's ``*layernorm`` children (input, post-attention, and the
        pre/post-feed-forward ones of Gemma 2/3 and EXAONE 4) and the final norm. The per-head q/k norms act on
        head_dim and are not among them."""
        norms = [mod for layer in self.layers for name, mod in layer.named_children() if name.endswith("layernorm")]
        return norms + [self.model.model.norm]

    def stem_members(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, dim) of every tensor hidden channel c spans, each once (a tied LM head is the embedding).

        Embedding column c (and an untied LM head's), input column c of q/k/v/gate/up, output row c (and bias
        element) of o/down, element c of every hidden-size norm's weight and bias (OLMo's have none).
        """
        embed = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        pairs: list[tuple[nn.Parameter, int]] = [(embed.weight, 1)]
        if head is not None and head.weight is not embed.weight:
            pairs.append((head.weight, 1))
        for layer in self.layers:
            q, k, v, o = self.attention_projections(layer)
            gate, up, down = self.mlp_projections(layer)
            pairs += [(lin.weight, 1) for lin in (q, k, v, gate, up)]
            for lin in (o, down):
                pairs.append((lin.weight, 0))
                if lin.bias is not None:
                    pairs.append((lin.bias, 0))
        for norm in self.hidden_norms():
            pairs += [(p, 0) for p in norm.parameters(recurse=False)]
        return pairs

    def hidden_multiple(self, head_counts: list[int]) -> int:
        """Stem pruning may leave hidden sizes that are multiples of this: the lcm of the config head counts the
        model may be saved with, for families whose config checks ``hidden_size % num_attention_heads``; else 1."""
        if self.family.model_type not in _HIDDEN_DIVISIBLE_BY_HEADS:
            return 1
        return math.lcm(*[h for h in head_counts if h > 0]) if any(h > 0 for h in head_counts) else 1

    def sync_hidden(self) -> None:
        """Make every hidden-size attribute agree with the (possibly stem-pruned) embedding width."""
        hidden = self.model.get_input_embeddings().weight.shape[1]
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        embed.embedding_dim = hidden
        if isinstance(head, nn.Linear):
            head.in_features = hidden
        for norm in self.hidden_norms():
            if hasattr(norm, "normalized_shape"):  # OLMo's weightless LayerNorm keeps its shape as an attribute
                norm.normalized_shape = (hidden,)
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "hidden_size"):
                layer.hidden_size = hidden
            self.sync_layer(i)
        self.config.hidden_size = hidden

    def keep_embedding_scale(self, old_hidden: int, optimizer=None) -> None:
        """Gemma multiplies embeddings by sqrt(hidden_size), and a reload rebuilds that factor from the new size:
        fold the ratio into the embedding so the function is unchanged (and, with a tied LM head, its inverse into
        the final norm's ``1 + w``). Other families: nothing to do."""
        if self.family.model_type not in _SQRT_HIDDEN_EMBEDDING or old_hidden == self.hidden_size:
            return
        embed = self.model.get_input_embeddings()
        ratio = math.sqrt(old_hidden / self.hidden_size)
        state = optimizer.state.get(embed.weight, {}) if optimizer is not None else {}
        with torch.no_grad():
            embed.weight.mul_(ratio)
            for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):  # moments in the parameter's new units
                if torch.is_tensor(state.get(key)) and state[key].shape == embed.weight.shape:
                    state[key].mul_(ratio ** power)
            embed.embed_scale.fill_(self.hidden_size ** 0.5)
            embed.scalar_embed_scale = self.hidden_size ** 0.5
            head = self.model.get_output_embeddings()
            if head is not None and head.weight is embed.weight:
                final = self.model.model.norm.weight
                final.copy_((1.0 + final) / ratio - 1.0)

    def record_hidden(self) -> None:
        """Make head_dim explicit in the config once hidden / heads no longer gives it."""
        if getattr(self.config, "head_dim", None) != self.head_dim:
            self.config.head_dim = self.head_dim

    # -- parameter accounting ---------------------------------------------------------------------
    def attention_params(self, index: int) -> int:
        """Parameters of the attention projections of one layer (weights and biases)."""
        return sum(p.numel() for lin in self.attention_projections(self.layers[index]) for p in lin.parameters())

    def mlp_params(self, index: int) -> int:
        """Parameters of the MLP projections of one layer (weights and biases)."""
        return sum(p.numel() for lin in self.mlp_projections(self.layers[index]) for p in lin.parameters())

    def layer_params(self, index: int) -> int:
        """Prunable parameters of one layer: its attention and MLP projections."""
        return self.attention_params(index) + self.mlp_params(index)

    def prunable_params(self) -> int:
        """Parameters of every attention and MLP projection (what ``--sparsity`` refers to)."""
        return sum(self.layer_params(i) for i in range(len(self.layers)))

    def params_per_query_head(self, index: int) -> int:
        """Parameters removed with one query head: its Q rows (+bias) and its O columns."""
        q, _, _, _ = self.attention_projections(self.layers[index])
        per = 2 * self.head_dim * self.hidden_size
        return per + (self.head_dim if q.bias is not None else 0)

    def params_per_kv_head(self, index: int) -> int:
        """Parameters removed with one KV head alone: its K and V rows (+biases)."""
        _, k, _, _ = self.attention_projections(self.layers[index])
        per = 2 * self.head_dim * self.hidden_size
        return per + (2 * self.head_dim if k.bias is not None else 0)

    def o_bias_params(self) -> int:
        """Parameters of one layer's o_proj bias (0 without one): layer 0, which always keeps its attention."""
        _, _, _, o = self.attention_projections(self.layers[0])
        return o.bias.numel() if o.bias is not None else 0

    def params_per_channel(self, index: int) -> int:
        """Parameters removed with one MLP channel: gate and up rows, down column (+biases)."""
        gate, up, down = self.mlp_projections(self.layers[index])
        per = 3 * self.hidden_size
        per += sum(1 for lin in (gate, up) if lin.bias is not None)
        return per


def decoder_body(model: nn.Module) -> nn.Module:
    """The model without its LM head (embedding, decoder layers, final norm): every supported family keeps it as
    ``model.model``."""
    return model.model


def fused_lm_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when a supported model's logits are exactly ``lm_head(last hidden state)``, else None.

    Then the loss can be fused with the head (kernels.linear_cross_entropy). Gemma 2/3 soft-cap
    their logits and Granite divides them by ``logits_scaling``: those keep the model's own loss.
    """
    config = getattr(model, "config", None)
    if config is None or base_model_type(config) not in FAMILIES or getattr(model, "model", None) is None:
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) not in (None, 1):
        return None
    return head


def count_params(*modules: nn.Module) -> int:
    """Total parameter count of the modules, counting tied and shared weights once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# Serving export (adapt_engine/export.py) writes Llama-shaped layers (RMSNorm, SiLU-gated MLP, RoPE on every
# layer, optional q/k/v/o and MLP biases): vLLM's DeciLM and llama.cpp's `deci`. What else a family does
# has no place there, so those families are refused with the reason.
SERVING_BLOCKERS: dict[str, str] = {
    "qwen3": "per-head q/k RMSNorm", "gemma3_text": "per-head q/k RMSNorm, (1 + w) norms and GELU",
    "exaone4": "per-head q/k RMSNorm and post-norms", "gemma": "(1 + w) RMSNorm, GELU and embedding scaling",
    "gemma2": "(1 + w) RMSNorm, GELU, post-norms and logit soft-capping",
    "granite": "embedding, residual, attention and logit multipliers", "olmo": "weightless LayerNorm and qkv clipping",
    "smollm3": "layers without RoPE (NoPE)", "ministral": "per-layer sliding-window attention",
    "ernie4_5": "interleaved RoPE",
    # Llama-like, but not yet checked against both engines: refused rather than risk wrong output.
    "helium": "layers not yet verified in vLLM and llama.cpp",
    "seed_oss": "layers not yet verified in vLLM and llama.cpp",
}


def serving_blocker(config) -> str | None:
    """Why a model of this config's family cannot be written as a DeciLM / llama.cpp `deci` model, or None."""
    family = family_of(config).model_type
    reason = SERVING_BLOCKERS.get(family)
    return f"{family} models have {reason}" if reason else None
