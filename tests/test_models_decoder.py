"""Decoder LM: generation with the KV cache equals a full forward without it; padding, EOS, hooks, FP8 linears."""

from __future__ import annotations

import pytest
import torch

import helpers  # noqa: F401
from helpers.fp8 import Fp8Linear, quantize_model
from helpers.kvcache import KVCache
from helpers.models import Decoder, DecoderConfig

# fp32 throughout: the cached path multiplies [B, 1, D] slices while the full forward multiplies [B, T, D] blocks,
# so the two differ only by accumulation order (~1e-6 relative on these sizes).
ATOL = 2e-5


def _model(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(**{"vocab_size": 37, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "head_dim": 8,
                           "d_model": 32, "d_ff": 48, "max_seq_len": 64, **kw})
    return Decoder(cfg).eval()


def _left_padded(b: int, t0: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (b, t0), generator=g)
    lens = torch.randint(1, t0 + 1, (b,), generator=g)
    lens[0] = t0  # one full row
    mask = torch.arange(t0)[None, :] >= (t0 - lens)[:, None]
    return torch.where(mask, prompt, torch.zeros_like(prompt)), mask


def _full_logprobs(model: Decoder, prompt, prompt_mask, out, temperature: float) -> torch.Tensor:
    """Log-probs of the generated tokens from ONE forward over prompt + response, without a cache."""
    seq = torch.cat([prompt, out.tokens], dim=1)
    mask = torch.cat([prompt_mask, out.mask], dim=1)
    logits = model(seq, mask=mask)[:, prompt.shape[1] - 1:-1]  # logits that predicted each response token
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(-1, out.tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_generation_with_cache_equals_full_forward(qk_norm, n_kv_head, temperature):
    model = _model(qk_norm=qk_norm, n_kv_head=n_kv_head)
    prompt, pmask = _left_padded(5, 7, 37, seed=n_kv_head)
    out = model.generate(prompt, 9, prompt_mask=pmask, temperature=temperature,
                         generator=torch.Generator().manual_seed(3))
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (5, 9)
    assert out.tokens.dtype == torch.long and out.logprobs.dtype == torch.float32 and out.mask.dtype == torch.bool
    full = _full_logprobs(model, prompt, pmask, out, temperature)
    torch.testing.assert_close(out.logprobs[out.mask], full[out.mask], atol=ATOL, rtol=0)
    if temperature == 0:  # greedy: every token is the argmax of the full forward
        seq = torch.cat([prompt, out.tokens], 1)
        logits = model(seq, mask=torch.cat([pmask, out.mask], 1))[:, 6:-1]
        assert torch.equal(logits.argmax(-1), out.tokens)


def test_left_padding_does_not_change_a_row():
    model = _model(seed=1)
    prompt, pmask = _left_padded(4, 6, 37, seed=5)
    out = model.generate(prompt, 6, prompt_mask=pmask, temperature=0.0)
    for row in range(4):
        alone = prompt[row:row + 1][:, pmask[row]]  # the real tokens only
        solo = model.generate(alone, 6, temperature=0.0)
        assert torch.equal(solo.tokens[0], out.tokens[row])
        torch.testing.assert_close(solo.logprobs[0], out.logprobs[row], atol=ATOL, rtol=0)


def test_chunked_forward_with_cache_equals_one_forward():
    model = _model(seed=2)
    x = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(0))
    full = model(x)
    cache = model.new_cache(3, 16)
    parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 11))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)
    assert cache.lengths == [11, 11] and bool(cache.key_mask[:, :11].all()) and not bool(cache.key_mask[:, 11:].any())


def test_eos_stops_a_row_and_pads_after_it():
    model = _model(seed=3)
    prompt = torch.randint(1, 37, (4, 5), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 8, temperature=0.0)
    eos = int(greedy.tokens[0, 2])  # row 0 emits it at step 2 (maybe others earlier)
    out = model.generate(prompt, 8, temperature=0.0, eos_id=eos, pad_id=36)
    for row in range(4):
        hits = (greedy.tokens[row] == eos).nonzero()
        stop = int(hits[0]) if len(hits) else 8
        assert torch.equal(out.tokens[row, :stop + 1], greedy.tokens[row, :stop + 1])
        assert bool(out.mask[row, :stop + 1].all()) and not bool(out.mask[row, stop + 1:].any())
        assert bool((out.tokens[row, stop + 1:] == 36).all()) and bool((out.logprobs[row, stop + 1:] == 0).all())
    assert int((greedy.tokens[0] == eos).nonzero()[0]) <= 2


def test_generate_reuses_a_preallocated_cache():
    model = _model(seed=4)
    cache = model.new_cache(2, 20)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    prompt = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(2))
    a = model.generate(prompt, 10, temperature=0.0, cache=cache)
    b = model.generate(prompt, 10, temperature=0.0, cache=cache)  # reset, refilled in place
    assert torch.equal(a.tokens, b.tokens) and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
    assert cache.lengths == [13, 13]  # the last sampled token is never fed back
    with pytest.raises(ValueError, match="max_len"):
        model.generate(prompt, 17, cache=cache)


def test_core_attention_hook_sees_q_k_v_after_qk_norm_and_rope():
    model = _model(seed=5, qk_norm=True)
    seen = {}

    def hook(module, args, kwargs):
        seen[kwargs["layer"]] = args

    handles = [blk.self_attn.core_attn.register_forward_pre_hook(hook, with_kwargs=True) for blk in model.layers]
    x = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(3))
    model(x)
    for h in handles:
        h.remove()
    assert sorted(seen) == [0, 1]
    q, k, v = seen[1]
    assert q.shape == (2, 4, 6, 8) and k.shape == v.shape == (2, 2, 6, 8)
    # RMSNorm with unit weight, then a rotation: each head vector of q and k has RMS 1, up to the eps = 1e-6 inside
    # the norm (at init a head's mean square is ~1e-3, so rms / sqrt(ms + eps) ~ 1 - 1e-3).
    torch.testing.assert_close(k.pow(2).mean(-1).sqrt(), torch.ones(2, 2, 6), atol=2e-3, rtol=0)
    torch.testing.assert_close(q.pow(2).mean(-1).sqrt(), torch.ones(2, 4, 6), atol=2e-3, rtol=0)
    assert not bool(torch.allclose(v.pow(2).mean(-1).sqrt(), torch.ones(2, 2, 6), atol=0.1))  # v is not normed


def test_module_names_and_fp8_linear_swap():
    model = _model(seed=6)
    names = {n for n, _ in model.named_modules()}
    for expect in ("embed_tokens", "layers.0.input_layernorm", "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                   "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj", "layers.0.self_attn.q_norm",
                   "layers.0.self_attn.k_norm", "layers.0.post_attention_layernorm", "layers.1.mlp.gate_proj",
                   "layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "norm", "lm_head"):
        assert expect in names, expect
    assert "layers.0.self_attn.q_norm" not in {n for n, _ in _model(qk_norm=False).named_modules()}
    fp8 = quantize_model(_model(seed=6), backend="torch")
    swapped = {n for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)}
    assert swapped == {f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    prompt = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(4))
    out = fp8.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    full = _full_logprobs(fp8, prompt, torch.ones_like(prompt, dtype=torch.bool), out, 1.0)
    # Activations are quantized per token group, so a token's FP8 matmul does not depend on its neighbours.
    torch.testing.assert_close(out.logprobs, full, atol=ATOL, rtol=0)
    # FP8 weights stay close to the high-precision model (loose: e4m3 has a 3-bit mantissa).
    with torch.no_grad():
        hp, lp = model(prompt), fp8(prompt)
    assert float((lp - hp).abs().max()) < 0.05 * float(hp.abs().max())


def test_bf16_model_and_cache():
    model = _model(seed=7).to(torch.bfloat16)
    prompt = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 5, temperature=0.0)
    assert out.logprobs.dtype == torch.float32 and bool(torch.isfinite(out.logprobs).all())
    with pytest.raises(ValueError, match="dtype"):
        model.generate(prompt, 5, cache=KVCache(2, 2, 9, 2, 8, dtype=torch.float32))


@pytest.mark.parametrize("kw, match", [
    ({"n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
    ({"head_dim": 7}, "even"),
    ({"n_layer": 0}, "n_layer"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"qk_norm": 1}, "qk_norm"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**kw)


def test_forward_and_generate_reject_bad_inputs():
    model = _model(seed=8)
    x = torch.randint(0, 37, (2, 5))
    with pytest.raises(ValueError, match="idx must be a long"):
        model(x.float())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(n_layer, batch, n_kv_head, head_dim\)"):
        model(x, cache=KVCache(2, 3, 8, 2, 8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, 0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(x[0], 3)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_decode_logits_replays_what_generate_sampled(qkv_bias):
    model = _model(seed=9, qkv_bias=qkv_bias)
    if qkv_bias:
        with torch.no_grad():
            for blk in model.layers:
                blk.self_attn.k_proj.bias.normal_()
    prompt, pmask = _left_padded(4, 5, 37, seed=9)
    out = model.generate(prompt, 7, prompt_mask=pmask, temperature=0.8, eos_id=3,
                         generator=torch.Generator().manual_seed(1))
    logits = model.decode_logits(prompt, out.tokens, prompt_mask=pmask, response_mask=out.mask,
                                 cache=model.new_cache(4, 12))
    logp = torch.log_softmax(logits / 0.8, -1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[out.mask], out.logprobs[out.mask], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model.decode_logits(prompt, out.tokens, cache=model.new_cache(4, 11))
