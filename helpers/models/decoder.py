"""A small decoder-only transformer LM in the nanoGPT style, laid out like HF Llama / Qwen3.

Architecture (Qwen3 when ``qk_norm=True``, Llama / Qwen2.5 without): token embedding; ``n_layer`` pre-norm blocks of
RMSNorm -> grouped-query self-attention with RoPE -> residual, RMSNorm -> SwiGLU MLP -> residual; final RMSNorm;
untied ``lm_head``. With ``qk_norm``, q and k get an RMSNorm over ``head_dim`` per head *before* RoPE (Qwen3's
``q_norm`` / ``k_norm``), which bounds their scale - the property the FP8 KV cache study is about.

Module names follow HF so that engines' parameter names line up and :func:`helpers.fp8.quantize_model`'s
``DEFAULT_SKIP`` keeps embeddings, norms and the head in high precision: ``embed_tokens``,
``layers.{i}.input_layernorm``, ``layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}`` (+ ``q_norm``, ``k_norm``),
``layers.{i}.post_attention_layernorm``, ``layers.{i}.mlp.{gate_proj,up_proj,down_proj}``, ``norm``, ``lm_head``.

Calibration hook point: ``layers.{i}.self_attn.core_attn`` is a parameter-free module called as
``core_attn(q, k, v, ...)`` with q ``[B, H, T, D]`` and k, v ``[B, H_kv, T, D]`` *after* QK-norm and RoPE - the
tensors an engine writes to its KV cache. A forward pre-hook on it sees them (as NeMo-RL's calibration does on
core attention); :mod:`helpers.kvcache.calibration` finds it by its ``is_core_attention = True`` marker, so the
arrow runs one way: ``models`` imports ``kvcache``, never the reverse.

KV cache: ``forward(idx, cache=...)`` appends the new k / v to any :class:`helpers.kvcache.KVCacheBase` (the
high-precision :class:`~helpers.kvcache.KVCache` or the FP8 one) and attends over the cache;
:meth:`Decoder.generate` fills a preallocated cache token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from helpers.kvcache.cache import KVCache, KVCacheBase, attention_reference

__all__ = ["DecoderConfig", "Decoder", "GenerationOutput", "default_positions"]


@dataclass
class DecoderConfig:
    """Shapes and constants of :class:`Decoder` (field names as in HF ``config.json`` where one exists)."""

    vocab_size: int = 64
    """V: token ids are in [0, V)."""
    n_layer: int = 2
    """Transformer blocks (HF ``num_hidden_layers``)."""
    n_head: int = 4
    """Query heads H (``num_attention_heads``)."""
    n_kv_head: int = 2
    """Key / value heads H_kv (``num_key_value_heads``); H must be a multiple (grouped-query attention)."""
    head_dim: int = 16
    """D per head; even (RoPE rotates pairs)."""
    d_model: int = 64
    """Residual width C (``hidden_size``)."""
    d_ff: int = 128
    """SwiGLU hidden width (``intermediate_size``)."""
    max_seq_len: int = 256
    """Longest sequence (prompt + generated) the model is used with; bounds RoPE positions and cache sizes."""
    qk_norm: bool = True
    """RMSNorm on q and k per head before RoPE (Qwen3); False = Llama / Qwen2.5."""
    qkv_bias: bool = False
    """Biases on q_proj / k_proj / v_proj (Qwen2 / Qwen2.5 have them; Llama and Qwen3 do not)."""
    rope_theta: float = 10000.0
    """RoPE base (Llama-2 / nanoGPT-style default; Qwen3 uses 1e6 for long contexts)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (``rms_norm_eps``; Qwen3 1e-6)."""
    init_std: float = 0.02
    """Std of the normal weight init (GPT-2 / nanoGPT); residual output projections get init_std / sqrt(2 n_layer)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "head_dim", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head must be a multiple of n_kv_head, got n_head={self.n_head}, "
                             f"n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("qk_norm", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


class GenerationOutput(NamedTuple):
    """What :meth:`Decoder.generate` returns (``T_new = max_new_tokens``).

    tokens: long ``[B, T_new]``, ``pad_id`` after a row's EOS. logprobs: fp32 ``[B, T_new]``, log-prob of each
    sampled token under the distribution sampled from (0 where ``mask`` is False). mask: bool ``[B, T_new]``, True
    for valid response tokens, up to and including EOS.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor


def default_positions(mask: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE positions ``[B, T]`` for tokens whose validity is ``mask`` bool ``[B, T]``: the count of real tokens
    before each one (``past`` [B] real tokens already cached), so left padding does not shift a row's positions.
    Padding slots get the position of the next real token (they are never attended to)."""
    pos = mask.long().cumsum(-1) - mask.long()  # real tokens strictly before this slot
    return pos if past is None else pos + past[:, None]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x ``[B, h, T, D]`` by the angles in cos / sin ``[B, 1, T, D]``
    (HF Llama's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CoreAttention(nn.Module):
    """Parameter-free attention core: the calibration hook point (q, k, v after QK-norm and RoPE).

    ``forward(q [B, H, T, D], k [B, H_kv, T, D], v, *, layer, cache, key_mask)``: with a cache, appends k / v and
    attends over the cache; without, attends causally over these T tokens (``key_mask`` bool [B, T]).
    Returns ``[B, H, T, D]`` in q's dtype. ``is_core_attention = True`` marks it for the calibration hooks
    (:mod:`helpers.kvcache.calibration` finds core attention by that protocol, without importing this module).
    """

    is_core_attention = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int,
                cache: KVCacheBase | None, key_mask: torch.Tensor) -> torch.Tensor:
        if cache is None:
            return attention_reference(q, k, v, key_mask).to(q.dtype)
        q = cache.prepare_query(layer, q)
        cache.append(layer, k, v, key_mask)
        return cache.attention(layer, q)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, hkv, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.core_attn = CoreAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor,
                cache: KVCacheBase | None) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, C]
        h, hkv, d = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = self.q_proj(x).view(b, t, h, d)
        k = self.k_proj(x).view(b, t, hkv, d)
        v = self.v_proj(x).view(b, t, hkv, d)
        if self.cfg.qk_norm:  # per head, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, h, T, D]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = self.core_attn(q, k, v, layer=self.layer, cache=cache, key_mask=key_mask)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * d))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor,
                cache: KVCacheBase | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The decoder LM. ``forward(idx [B, T]) -> logits [B, T, V]`` fp32; :meth:`generate` samples with a cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if not isinstance(cfg, DecoderConfig):
            raise ValueError(f"cfg must be a DecoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [D/2]
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """A high-precision :class:`KVCache` for this model (``dtype`` default: the model's)."""
        c = self.cfg
        return KVCache(c.n_layer, batch, max_len, c.n_kv_head, c.head_dim, dtype=dtype or self.dtype,
                       device=self.device)

    def _check_cache(self, cache: KVCacheBase, batch: int) -> None:
        c = self.cfg
        if not isinstance(cache, KVCacheBase):
            raise ValueError(f"cache must be a KVCacheBase, got {type(cache).__name__}")
        got = (cache.n_layer, cache.batch, cache.n_kv_head, cache.head_dim)
        if got != (c.n_layer, batch, c.n_kv_head, c.head_dim):
            raise ValueError(f"cache must have (n_layer, batch, n_kv_head, head_dim) = "
                             f"{(c.n_layer, batch, c.n_kv_head, c.head_dim)}, got {got}")
        if len(set(cache.lengths)) != 1:
            raise ValueError(f"cache layers must have equal lengths between forwards, got {cache.lengths}")

    def forward(self, idx: torch.Tensor, *, cache: KVCacheBase | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits fp32 ``[B, T, V]`` for token ids ``idx`` long ``[B, T]``.

        cache: the new k / v are appended at the cache's current length and attention covers everything cached.
        mask: bool ``[B, T]``, True for real tokens, False for padding (never attended to; its logits are
            meaningless). None = all real.
        positions: long ``[B, T]`` RoPE positions; default :func:`default_positions` (real tokens before each
            slot, counting the ones already in the cache).
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.ndim != 2:
            got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a long tensor [B, T], got {got}")
        b, t = idx.shape
        past_len = 0 if cache is None else cache.length
        if cache is not None:
            self._check_cache(cache, b)
        if past_len + t > self.cfg.max_seq_len:
            raise ValueError(f"cannot forward {t} tokens after {past_len} cached ones: max_seq_len is "
                             f"{self.cfg.max_seq_len}")
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=idx.device)
        elif mask.dtype != torch.bool or tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must be a bool tensor [{b}, {t}], got {mask.dtype} {tuple(mask.shape)}")
        if positions is None:
            past = None if cache is None else cache.key_mask[:, :past_len].sum(-1)
            positions = default_positions(mask, past)
        elif tuple(positions.shape) != (b, t):
            raise ValueError(f"positions must be [{b}, {t}], got {tuple(positions.shape)}")
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        x = self.embed_tokens(idx)  # [B, T, C]
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def decode_logits(self, prompt: torch.Tensor, response: torch.Tensor, *, cache: KVCacheBase,
                      prompt_mask: torch.Tensor | None = None, response_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The logits a rollout engine computes while decoding ``response`` long ``[B, T_new]`` after ``prompt``
        ``[B, T0]`` token by token through ``cache`` (reset first): fp32 ``[B, T_new, V]``, row ``j`` being the
        distribution ``response[:, j]`` was drawn from. Same calls as :meth:`generate` (one prefill, then one
        token per step), with the tokens given instead of sampled; masks as in :meth:`generate` (response_mask
        False after EOS)."""
        b, t_new = response.shape
        if cache.max_len < prompt.shape[1] + t_new:
            raise ValueError(f"cache.max_len must be >= {prompt.shape[1] + t_new}, got {cache.max_len}")
        if response_mask is None:
            response_mask = torch.ones_like(response, dtype=torch.bool)
        cache.reset()
        out = torch.empty(b, t_new, self.cfg.vocab_size, dtype=torch.float32, device=response.device)
        out[:, 0] = self(prompt, cache=cache, mask=prompt_mask)[:, -1]
        for j in range(1, t_new):
            out[:, j] = self(response[:, j - 1:j], cache=cache, mask=response_mask[:, j - 1:j])[:, -1]
        return out

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, prompt_mask: torch.Tensor | None = None,
                 temperature: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
                 generator: torch.Generator | None = None, cache: KVCacheBase | None = None,
                 logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GenerationOutput:
        """Sample ``max_new_tokens`` after ``prompt`` long ``[B, T0]`` (left-padded; ``prompt_mask`` bool
        ``[B, T0]`` True on real tokens), filling a preallocated KV cache.

        temperature: > 0 samples from ``softmax(logits / temperature)``; 0 is greedy (argmax), its log-prob taken
            under ``softmax(logits)``. eos_id: a row stops after sampling it (EOS is kept, valid in ``mask``);
            later positions hold ``pad_id`` and are masked. generator: for ``torch.multinomial``.
        cache: any :class:`~helpers.kvcache.KVCacheBase` with ``max_len >= T0 + max_new_tokens``; it is
            :meth:`~helpers.kvcache.KVCacheBase.reset` first (storage reused, scales kept). None allocates a
            high-precision cache sized for the call.
        logits_processor: maps each step's logits ``[B, V]`` to the logits actually sampled from (and whose
            log-probs are returned); a rollout engine's own perturbation, e.g. injected noise. None: identity.
        """
        if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.long or prompt.ndim != 2 or prompt.shape[1] < 1:
            got = (prompt.dtype, tuple(prompt.shape)) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt must be a long tensor [B, T0] with T0 >= 1, got {got}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not (temperature >= 0) or math.isinf(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        b, t0 = prompt.shape
        total = t0 + max_new_tokens
        if cache is None:
            cache = self.new_cache(b, total)
        elif cache.max_len < total:
            raise ValueError(f"cache.max_len must be >= prompt length + max_new_tokens = {total}, "
                             f"got {cache.max_len}")
        cache.reset()
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
        tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=prompt.device)
        logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=prompt.device)
        valid = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=prompt.device)
        alive = torch.ones(b, dtype=torch.bool, device=prompt.device)  # rows that have not emitted EOS
        logits = self(prompt, cache=cache, mask=prompt_mask)[:, -1]  # [B, V]
        for step in range(max_new_tokens):
            if logits_processor is not None:
                logits = logits_processor(logits)
            if temperature == 0:
                logp = torch.log_softmax(logits, dim=-1)
                nxt = logp.argmax(dim=-1)
            else:
                logp = torch.log_softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            tokens[:, step] = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            logprobs[:, step] = torch.where(alive, logp.gather(-1, nxt[:, None]).squeeze(-1), 0.0)
            valid[:, step] = alive
            if eos_id is not None:
                alive = alive & (nxt != eos_id)
            if step + 1 == max_new_tokens or not bool(alive.any()):
                break
            # A finished row feeds pad tokens marked invalid: they are cached but never attended to.
            logits = self(tokens[:, step:step + 1], cache=cache, mask=alive[:, None])[:, -1]
        return GenerationOutput(tokens, logprobs, valid)
