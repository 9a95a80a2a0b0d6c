"""The two config files that describe a Mixtral checkpoint, read and written: Hugging Face's
config.json and Mistral's params.json, each into and out of our `ModelArgs`, with every field
checked (a wrong type or an unsupported variant is a `ConfigError` naming the file and field);
and the dtype names those files and our command line use.

Kept apart from formats.py, which holds the tensor layouts: a config says what shape the model
has, a layout says where its tensors sit in the files.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mixtral.config import ModelArgs


class ConfigError(ValueError):
    pass


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _get(cfg: dict, key: str, source: str, default: Any = ..., kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, str) and value.isdigit():
        value = int(value)  # some params.json files carry numbers as strings
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{source}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _build(source: str, **fields: object) -> ModelArgs:
    try:
        return ModelArgs(**fields)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    model_type = cfg.get("model_type", "mixtral")
    if model_type != "mixtral":
        raise ConfigError(f"{source}: model_type is {model_type!r}; only 'mixtral' is supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not Mixtral's 'silu'")
    if cfg.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: tie_word_embeddings=true is not a Mixtral checkpoint")
    rope = cfg.get("rope_parameters") or {}  # transformers 5 moved rope_theta in here
    for scaling in (rope, cfg.get("rope_scaling") or {}):
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"{source}: RoPE scaling {scaling!r} is not supported")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6))
    dim = _get(cfg, "hidden_size", source)
    heads = _get(cfg, "num_attention_heads", source)
    return _build(
        source,
        dim=dim,
        n_layers=_get(cfg, "num_hidden_layers", source),
        n_heads=heads,
        n_kv_heads=_get(cfg, "num_key_value_heads", source, heads),
        head_dim=_get(cfg, "head_dim", source, dim // heads if heads else 0),
        hidden_dim=_get(cfg, "intermediate_size", source),
        num_experts=_get(cfg, "num_local_experts", source),
        num_experts_per_tok=_get(cfg, "num_experts_per_tok", source),
        vocab_size=_get(cfg, "vocab_size", source),
        rope_theta=_get({"rope_theta": theta}, "rope_theta", source, kind=float),
        norm_eps=_get(cfg, "rms_norm_eps", source, 1e-5, float),
        max_seq_len=_get(cfg, "max_position_embeddings", source, 32768),
        sliding_window=_get(cfg, "sliding_window", source, None),
        router_aux_loss_coef=_get(cfg, "router_aux_loss_coef", source, 0.02, float),
    )


def args_from_params(params: dict, source: str = "params.json") -> ModelArgs:
    if "hidden_size" in params:  # HF-named params.json, as shipped beside consolidated.0X.pt
        return args_from_hf_config({"model_type": "mixtral", **params}, source)
    moe = params.get("moe")
    if not isinstance(moe, dict):
        raise ConfigError(f"{source}: no 'moe' section: this is a dense model, not Mixtral")
    dim = _get(params, "dim", source)
    heads = _get(params, "n_heads", source)
    window = _get(params, "sliding_window", source, None)
    return _build(
        source,
        dim=dim,
        n_layers=_get(params, "n_layers", source),
        n_heads=heads,
        n_kv_heads=_get(params, "n_kv_heads", source, heads),
        head_dim=_get(params, "head_dim", source, dim // heads if heads else 0),
        hidden_dim=_get(params, "hidden_dim", source),
        num_experts=_get(moe, "num_experts", f"{source} moe"),
        num_experts_per_tok=_get(moe, "num_experts_per_tok", f"{source} moe"),
        vocab_size=_get(params, "vocab_size", source),
        # params.json of 8x7B has no rope_theta: Mistral's code infers 1e6 (1e4 with SWA)
        rope_theta=_get(params, "rope_theta", source, 1e6 if window is None else 1e4, float),
        norm_eps=_get(params, "norm_eps", source, 1e-5, float),
        max_seq_len=_get(params, "max_seq_len", source, 32768),
        sliding_window=window,
    )


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json as the hub ships it (readable by transformers 4.36+ and 5.x)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "num_local_experts": args.num_experts,
        "num_experts_per_tok": args.num_experts_per_tok,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "sliding_window": args.sliding_window,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype_name(dtype),
        "use_cache": True,
    }


def params_json(args: ModelArgs) -> dict:
    """params.json as Mistral ships it; fields with their Mixtral value are left implicit."""
    params: dict = {
        "dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim,
        "hidden_dim": args.hidden_dim, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "moe": {"num_experts_per_tok": args.num_experts_per_tok, "num_experts": args.num_experts},
    }
    inferred_theta = 1e6 if args.sliding_window is None else 1e4
    if not math.isclose(args.rope_theta, inferred_theta):
        params["rope_theta"] = args.rope_theta
    if args.sliding_window is not None:
        params["sliding_window"] = args.sliding_window
    if args.max_seq_len != 32768:
        params["max_seq_len"] = args.max_seq_len
    return params


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(value, value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of bf16, fp16, fp32")
    return DTYPES[name]
