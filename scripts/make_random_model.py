"""Write a random-weight Llama-shaped model straight to safetensors shards, one decoder layer per shard.

Never more than one layer's tensors (or one chunk of the embedding) is in memory, so an 8B model (16 GB in
bf16) is written with well under 2 GB of RAM. The weights are random (normal, std ``initializer_range``;
norms at 1): the model is for measuring memory and time of a prune, not quality. The tokenizer is the
built-in SmolLM2's (its 49,152 ids are valid in any larger vocabulary), so `adapt-engine prune` runs on the
output with its default calibration text.

    python scripts/make_random_model.py --shape llama-3.1-8b --output /scratch/llama-8b-random
    python scripts/make_random_model.py --shape llama-3.2-1b --layers 4 --output out/tiny   # fewer layers
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapt_engine.dtypes import parse_dtype
from adapt_engine.fsio import atomic_dir, atomic_write_json, preflight_output

# Public configs of the Llama 3 family (the fields that set tensor shapes and RoPE).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, head_dim=64, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         intermediate_size=8192, head_dim=128, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, head_dim=128, tie_word_embeddings=False,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_act="silu",
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False,
              mlp_bias=False, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001)
EMBED_CHUNK_ROWS = 8192  # rows of the embedding generated at a time (bounds the float32 scratch)


def config_for(shape: str, layers: int | None, dtype: str, overrides: dict | None = None) -> dict:
    """The config.json of a named shape (``layers`` overrides the depth, ``overrides`` any field)."""
    config = {**COMMON, **SHAPES[shape], **(overrides or {}), "torch_dtype": dtype}
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def _random(shape: tuple[int, ...], std: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, EMBED_CHUNK_ROWS * 4096 // max(1, shape[-1]))
    for start in range(0, shape[0], rows):  # float32 scratch of one chunk, not of the whole tensor
        chunk = out[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=gen) * std)
    return out


def layer_tensors(config: dict, index: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer ``index`` under its transformers name."""
    h, d, std = config["hidden_size"], config["head_dim"], config["initializer_range"]
    q, kv, ff = config["num_attention_heads"] * d, config["num_key_value_heads"] * d, config["intermediate_size"]
    p = f"model.layers.{index}."
    shapes = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h),
              "mlp.down_proj.weight": (h, ff)}
    out = {p + name: _random(shape, std, dtype, gen) for name, shape in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def _save_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    from adapt_engine.models import default_model_path

    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))


def write_random_model(output: str | Path, shape: str, layers: int | None = None, dtype: str = "bfloat16",
                       seed: int = 0, overwrite: bool = False, tokenizer: bool = True,
                       overrides: dict | None = None) -> dict:
    """Write the model shard by shard (atomically: the folder appears complete or not at all); returns a
    summary with the parameter count and bytes written."""
    config = config_for(shape, layers, dtype, overrides)
    torch_dtype = parse_dtype(dtype)
    n_layers = config["num_hidden_layers"]
    untied = not config["tie_word_embeddings"]
    h, vocab = config["hidden_size"], config["vocab_size"]
    names = ["embed"] + [f"layer{i}" for i in range(n_layers)] + ["head"]
    files = {part: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, part in enumerate(names)}
    weight_map: dict[str, str] = {}
    params = 0
    gen = torch.Generator().manual_seed(seed)
    with atomic_dir(output, overwrite=overwrite, marker="random-model") as tmp:
        for part in names:
            if part == "embed":
                tensors = {"model.embed_tokens.weight": _random((vocab, h), config["initializer_range"], torch_dtype,
                                                                gen)}
            elif part == "head":
                tensors = {"model.norm.weight": torch.ones(h, dtype=torch_dtype)}
                if untied:
                    tensors["lm_head.weight"] = _random((vocab, h), config["initializer_range"], torch_dtype, gen)
            else:
                tensors = layer_tensors(config, int(part[5:]), torch_dtype, gen)
            save_file(tensors, str(tmp / files[part]), metadata={"format": "pt"})
            params += sum(t.numel() for t in tensors.values())
            weight_map.update({name: files[part] for name in tensors})
            del tensors
        size = sum((tmp / f).stat().st_size for f in files.values())
        atomic_write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2)
        atomic_write_json(tmp / "config.json", config, indent=2)
        if tokenizer:
            _save_tokenizer(tmp)
    return {"output": str(output), "shape": shape, "layers": n_layers, "params": params, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    """Command line of the script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--output", required=True, help="folder to write (atomically)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a folder this script wrote")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    config = config_for(args.shape, args.layers, args.dtype)
    # Rough size for the free-space check: every parameter at the dtype's width.
    h, v, d = config["hidden_size"], config["vocab_size"], config["head_dim"]
    per_layer = (2 * config["num_attention_heads"] * d + 2 * config["num_key_value_heads"] * d
                 + 3 * config["intermediate_size"]) * h
    n = per_layer * config["num_hidden_layers"] + v * h * (1 if config["tie_word_embeddings"] else 2)
    preflight_output(args.output, overwrite=args.overwrite, need_bytes=n * parse_dtype(args.dtype).itemsize)
    t0 = time.perf_counter()
    summary = write_random_model(args.output, args.shape, args.layers, args.dtype, args.seed, args.overwrite)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
