"""A model's shape from its config alone: what the estimator needs to know about an
architecture (layers, widths, linear layers, vocabulary), read without loading any weights
(notebooks 01 and 02).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
import torch


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a transformer block: name, in/out features, bias, group."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    group: str = "attention"  # attention | mlp

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a causal LM, from its config alone."""

    name: str
    family: str  # gpt_neox | gptj | llama (also mistral, qwen2, ...) | opt | generic
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    tied_embeddings: bool
    linears: tuple  # LinearSpec per block
    norm: str = "layernorm"  # layernorm | rmsnorm
    norms_per_block: int = 2
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, GPT-J)
    activation: str = "gelu"
    gated_mlp: bool = False
    head_bias: bool = False
    position_embeddings: int = 0  # learned position rows (OPT); 0 with rotary embeddings
    resid_dropout: float = 0.0
    extra_linears: tuple = ()  # quantized linears outside the blocks (OPT's project_in/out)
    embed_dim: int = 0  # width of the token embeddings and head when it differs from hidden
    buffer_bytes: int = 0  # rotary tables (float32 buffers; get_memory_footprint counts them)
    # attention written out where the installed transformers has no sdpa path for the family
    # (GPT-J before transformers 5.24): autograd then keeps each query's row of scores too
    eager_attention: bool = False

    # ---- parameter counts
    def n_linear_params(self) -> int:
        """Weights of the linear layers that are stored in 4-bit (all blocks)."""
        per_block = sum(s.params for s in self.linears)
        return self.layers * per_block + sum(s.params for s in self.extra_linears)

    def n_embedding_params(self) -> int:
        return self.vocab * (self.embed_dim or self.hidden) + \
            self.position_embeddings * self.hidden

    def n_head_params(self) -> int:
        bias = self.vocab if self.head_bias else 0
        if self.tied_embeddings:
            return bias
        return self.vocab * (self.embed_dim or self.hidden) + bias

    @property
    def params_per_norm(self) -> int:
        """A LayerNorm has a weight and a bias; an RMSNorm a weight only."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def n_norm_params(self) -> int:
        return (self.layers * self.norms_per_block + 1) * self.params_per_norm

    def n_bias_params(self) -> int:
        return self.layers * sum(s.d_out for s in self.linears if s.bias) + \
            sum(s.d_out for s in self.extra_linears if s.bias)

    def n_16bit_params(self) -> int:
        """Parameters that stay 16-bit: embeddings, head, norms, biases."""
        return (self.n_embedding_params() + self.n_head_params() + self.n_norm_params()
                + self.n_bias_params())

    def n_params(self) -> int:
        return self.n_linear_params() + self.n_16bit_params()


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _gptj_tables_per_layer() -> bool:
    """GPT-J as the installed transformers writes it: before 5.24 each attention layer holds its
    own sin/cos table and computes attention in eager mode; since, one shared rotary module
    and sdpa."""
    from transformers.models.gptj import modeling_gptj

    return "GPTJRotaryEmbedding" not in modeling_gptj.GPTJModel.__init__.__code__.co_names


_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "olmo",
          "olmo2", "granite", "stablelm", "cohere", "internlm2", "yi", "deepseek"}


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of a transformers config (object or dict) or of a loaded model.

    Handles GPT-NeoX (fused query_key_value of width 3h, dense, dense_h_to_4h, dense_4h_to_h),
    GPT-J (q_proj, k_proj, v_proj, out_proj, fc_in, fc_out), Llama/Mistral/Qwen2 and their kin
    (q, k, v with grouped key/value heads, o, gate, up, down) and OPT (q, k, v, out_proj, fc1,
    fc2); anything else is read from the usual config names as a Llama-like block when its
    activation is SiLU, else as a GPT-like one.
    """
    from transformers import CONFIG_MAPPING

    cfg = config.config if isinstance(config, torch.nn.Module) else config
    if isinstance(cfg, Mapping) and cfg.get("model_type") in CONFIG_MAPPING:
        # a dict with a model_type transformers knows becomes its config (with its defaults);
        # any other dict is read as it is
        d = dict(cfg)
        cfg = CONFIG_MAPPING[d.pop("model_type")](**d)
    mt = str(_cfg_get(cfg, "model_type", default="")).lower()
    h = int(_cfg_get(cfg, "hidden_size", "n_embd", "d_model", "dim"))
    a = int(_cfg_get(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    ctx = int(_cfg_get(cfg, "max_position_embeddings", "n_positions", "n_ctx",
                       "max_sequence_length", "seq_length", default=2048))
    # what every family reads the same way; the families below set their linears and the rest
    common = dict(
        name=name or _cfg_get(cfg, "_name_or_path", "name_or_path", default="") or mt or "model",
        vocab=int(_cfg_get(cfg, "vocab_size")), hidden=h,
        layers=int(_cfg_get(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")),
        heads=a, kv_heads=a, head_dim=h // a, context=ctx,
        tied_embeddings=bool(_cfg_get(cfg, "tie_word_embeddings",
                                      default=mt in ("opt", "gemma", "gemma2"))))

    if mt == "gpt_neox":
        ff = int(_cfg_get(cfg, "intermediate_size", default=4 * h))
        bias = bool(_cfg_get(cfg, "attention_bias", default=True))
        linears = (LinearSpec("query_key_value", h, 3 * h, bias, "attention"),
                   LinearSpec("dense", h, h, bias, "attention"))
        return ModelShape(
            **common, family="gpt_neox", intermediate=ff,
            linears=linears + _mlp(h, ff, "dense_h_to_4h", "dense_4h_to_h"),
            parallel_residual=bool(_cfg_get(cfg, "use_parallel_residual", default=True)),
            activation=str(_cfg_get(cfg, "hidden_act", default="gelu")),
            resid_dropout=float(_cfg_get(cfg, "hidden_dropout", default=0.0)),
            buffer_bytes=_inv_freq_bytes(cfg, h // a))
    if mt == "gptj":
        ff = int(_cfg_get(cfg, "n_inner", default=4 * h) or 4 * h)
        old = _gptj_tables_per_layer()
        tables = common["layers"] if old else 1
        return ModelShape(
            **common, family="gptj", intermediate=ff,
            linears=_attention(h, h, h, "out_proj", False) + _mlp(h, ff, "fc_in", "fc_out"),
            norms_per_block=1, parallel_residual=True,
            activation=str(_cfg_get(cfg, "activation_function", default="gelu_new")),
            head_bias=True, resid_dropout=float(_cfg_get(cfg, "resid_pdrop", default=0.0)),
            # sin/cos tables of context x rotary_dim float32 values
            buffer_bytes=tables * 4 * ctx * int(_cfg_get(cfg, "rotary_dim", default=h // a) or h),
            eager_attention=old)
    if mt == "opt":
        ff = int(_cfg_get(cfg, "ffn_dim", default=4 * h))
        bias = bool(_cfg_get(cfg, "enable_bias", default=True))
        proj = int(_cfg_get(cfg, "word_embed_proj_dim", default=h) or h)
        extra = ()
        if proj != h:
            extra = (LinearSpec("project_in", proj, h, False, "other"),
                     LinearSpec("project_out", h, proj, False, "other"))
        return ModelShape(
            **common, family="opt", intermediate=ff,
            linears=_attention(h, h, h, "out_proj", bias) + _mlp(h, ff, "fc1", "fc2", bias=bias),
            activation=str(_cfg_get(cfg, "activation_function", default="relu")),
            position_embeddings=ctx + 2,
            resid_dropout=float(_cfg_get(cfg, "dropout", default=0.1)),
            extra_linears=extra, embed_dim=proj)

    # anything else: the usual names, with grouped key/value heads and an explicit head_dim
    kv = int(_cfg_get(cfg, "num_key_value_heads", "n_kv_heads", default=a) or a)
    hd = int(_cfg_get(cfg, "head_dim", default=0) or h // a)
    common.update(kv_heads=kv, head_dim=hd)
    act = str(_cfg_get(cfg, "hidden_act", "activation_function", default="gelu"))
    ff = int(_cfg_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    if mt in _GATED or act in ("silu", "swiglu", "swish"):
        qb = bool(_cfg_get(cfg, "attention_bias", default=mt == "qwen2"))
        mb = bool(_cfg_get(cfg, "mlp_bias", default=False))
        ob = bool(_cfg_get(cfg, "attention_bias", default=False))
        linears = (_attention(h, a * hd, kv * hd, "o_proj", qb, ob)
                   + _mlp(h, ff, "gate_proj", "up_proj", "down_proj", bias=mb))
        return ModelShape(
            **common, family="llama" if mt in _GATED else "generic", intermediate=ff,
            linears=linears, norm="rmsnorm", activation=act, gated_mlp=True,
            buffer_bytes=_inv_freq_bytes(cfg, hd))
    return ModelShape(
        **common, family="generic", intermediate=ff, activation=act,
        linears=_attention(h, a * hd, kv * hd, "out_proj", True) + _mlp(h, ff, "fc_in", "fc_out"))


def _attention(h: int, q: int, kv: int, out: str, bias: bool, out_bias: bool | None = None):
    """q_proj, k_proj, v_proj (widths ``q``, ``kv``, ``kv``) and the output projection ``out``."""
    return (LinearSpec("q_proj", h, q, bias, "attention"),
            LinearSpec("k_proj", h, kv, bias, "attention"),
            LinearSpec("v_proj", h, kv, bias, "attention"),
            LinearSpec(out, q, h, bias if out_bias is None else out_bias, "attention"))


def _mlp(h: int, ff: int, *names: str, bias: bool = True):
    """The MLP's linears: every one but the last widens to ``ff``, the last narrows back."""
    return tuple(LinearSpec(n, h, ff, bias, "mlp") for n in names[:-1]) + (
        LinearSpec(names[-1], ff, h, bias, "mlp"),)


def _inv_freq_bytes(cfg, head_dim: int) -> int:
    """Rotary inverse frequencies: two float32 vectors (inv_freq, original_inv_freq) of half the
    rotary width."""
    rope = _cfg_get(cfg, "rope_parameters", "rope_scaling", default=None) or {}
    pct = float(_cfg_get(cfg, "rotary_pct", "partial_rotary_factor", default=None)
                or (rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None)
                or 1.0)
    return 2 * 4 * (int(head_dim * pct) // 2)


def as_shape(x) -> ModelShape:
    """A ModelShape from a ModelShape, a preset name, a config, a config dict or a model."""
    if isinstance(x, ModelShape):
        return x
    if isinstance(x, str):
        if x in _presets():
            return _presets()[x]
        raise ValueError(f"no model preset named {x!r}; presets: {', '.join(_presets()) or 'none'} "
                         f"(add a config JSON to {CONFIG_DIR.name}/ or pass a config)")
    return shape_from_config(x)


@functools.cache
def _presets(folder: Path = CONFIG_DIR) -> dict:
    """Model presets, name -> ModelShape, from the config JSON files in ``helpers/configs/``."""
    shapes = {}
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            shapes[p.stem] = shape_from_config(json.loads(p.read_text()), name=p.stem)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"model preset {p.name} is not a usable config ({err}); "
                             "it needs model_type, hidden_size, num_hidden_layers, "
                             "num_attention_heads and vocab_size") from None
    return shapes


def __getattr__(name):
    """``PRESETS`` (name -> ModelShape) is read on first use: reading it imports transformers."""
    if name == "PRESETS":
        return _presets()
    raise AttributeError(f"module 'helpers.shapes' has no attribute {name!r}")


def positions(model) -> int | None:
    """How many positions the model was built for (``max_position_embeddings`` or its family's
    name for it), or None where its config names none."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = _cfg_get(config, "max_position_embeddings", "n_positions", "n_ctx")
    return value if isinstance(value, int) and value > 0 else None


class SequenceTooLongError(ValueError):
    """MAX_LENGTH is longer than the positions the model has."""


def require_positions(model, seq_len: int) -> None:
    """Refuse a sequence longer than the model's positions, before any step runs: a model with a
    table of positions (GPT-J's rotary table, GPT-2's learned positions) would index past it,
    which on a GPU is a device-side assert that leaves the CUDA context unusable until the
    runtime restarts; a rotary model was never trained on those positions either."""
    n = positions(model)
    if n is not None and seq_len > n:
        raise SequenceTooLongError(
            f"MAX_LENGTH={seq_len} is longer than the {n:,} positions this model has "
            f"(max_position_embeddings of {getattr(model.config, 'name_or_path', '') or 'the model'}"
            f"); set MAX_LENGTH to at most {n}.")
