"""The rollout engine: weight sync equals a fresh quantization, KV recalibration on schedule, and the recorded
log-probs are those of the distribution it sampled from."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.fp8 import quant_weight
from helpers.fp8.linear import fp8_linears
from helpers.grpo import task
from helpers.grpo.engine import ENGINE_DTYPE, EngineConfig, RolloutEngine, WeightSyncAuditError
from helpers.grpo.trainer import CORRECTIONS, GRPOConfig, run_grpo
from helpers.kvcache import Fp8KVCache, KVCache, calibrate_kv_scales
from helpers.models.decoder import Decoder, DecoderConfig

N_DIGITS = 2
CONFIGS = {
    "bf16": EngineConfig(),
    "fp8": EngineConfig(linear="fp8", gemm="exact"),
    "fp8 bf16-gemm ue8m0": EngineConfig(linear="fp8", gemm="bf16", scale_fmt="ue8m0"),
    "fp8+kv": EngineConfig(linear="fp8", kv_cache="fp8", kv_policy="nemo_rl"),
}


def _policy(seed: int = 0, qk_norm: bool = True) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=task.VOCAB_SIZE, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64,
                        d_ff=96, max_seq_len=32, qk_norm=qk_norm)
    return Decoder(cfg)


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    probs = task.sample_problems(n, N_DIGITS, torch.Generator().manual_seed(seed))
    return task.encode_prompts(probs), task.encode_answers(probs)


def _engine(policy: Decoder, cfg: EngineConfig, n: int = 6) -> RolloutEngine:
    prompts, answers = _batch(n)
    return RolloutEngine(policy, cfg, batch=n, max_len=prompts.shape[1] + answers.shape[1],
                         calib_batch=torch.cat([prompts, answers], 1))


def _assert_engine_equals_fresh_quantization(trainer: Decoder, engine: RolloutEngine) -> None:
    state = trainer.state_dict()
    layers = fp8_linears(engine.model)
    assert (len(layers) == 14) == (engine.cfg.linear == "fp8")  # 2 layers x (q, k, v, o, gate, up, down)
    for name, layer in layers.items():
        q, s = quant_weight(state[f"{name}.weight"], layer.weight_block_size, scale_fmt=layer.scale_fmt,
                            backend="torch")
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale_inv, s), name
    fp8_keys = {f"{n}.{b}" for n in layers for b in ("weight", "weight_scale_inv")}
    for key, value in engine.model.state_dict().items():
        if key not in fp8_keys:  # embeddings, norms, lm_head (and bf16 linears): the trainer's values in bf16
            assert value.dtype == ENGINE_DTYPE and torch.equal(value, state[key].to(ENGINE_DTYPE)), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sync_equals_fresh_quantization_after_updates_in_place(name):
    trainer = _policy()
    engine = _engine(trainer, CONFIGS[name])
    _assert_engine_equals_fresh_quantization(trainer, engine)
    ptrs = {k: v.data_ptr() for k, v in engine.model.state_dict().items()}
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    prompts, answers = _batch(6, seed=1)
    for _ in range(2):  # two "updates"
        loss = trainer(torch.cat([prompts, answers], 1)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m = engine.sync(trainer, torch.cat([prompts, answers], 1))
        _assert_engine_equals_fresh_quantization(trainer, engine)
        assert m["engine/sync_layers"] == len(fp8_linears(engine.model))
    assert {k: v.data_ptr() for k, v in engine.model.state_dict().items()} == ptrs  # in place, per layer


@pytest.mark.parametrize("engine_name", ["fp8", "fp8+kv"])
def test_every_training_step_syncs_a_fresh_quantization(engine_name):
    calls = []

    def check(step, trainer, engine):
        _assert_engine_equals_fresh_quantization(trainer, engine)
        calls.append(step)

    cfg = GRPOConfig(steps=3, n_prompts=2, group_size=3, n_digits=N_DIGITS, eval_every=0, lr=1e-2)
    run_grpo(_policy(), CONFIGS[engine_name], CORRECTIONS["token_tis"], cfg, seed=0, on_sync=check)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("policy,expect_calibrations", [("nemo_rl", 3), ("nemo_rl_once", 1), ("unit", 0)])
def test_kv_scales_follow_the_policy_schedule(policy, expect_calibrations):
    trainer = _policy()
    engine = _engine(trainer, EngineConfig(linear="fp8", kv_cache="fp8", kv_policy=policy))
    first = engine.cache.scales()
    prompts, answers = _batch(6, seed=2)
    batch = torch.cat([prompts, answers], 1)
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(1.5)  # an update that changes the activations' range
    engine.sync(trainer, batch)
    engine.sync(trainer, batch)
    assert engine.n_calibrations == expect_calibrations
    now = engine.cache.scales()
    if policy == "nemo_rl":  # recalibrated on the trainer's policy and the batch given
        want = calibrate_kv_scales(trainer, [batch], policy="nemo_rl")
        assert all(torch.equal(getattr(now, t), getattr(want, t)) for t in "qkv")
    else:  # stale or unit: the first scales stay
        assert all(torch.equal(getattr(now, t), getattr(first, t)) for t in "qkv")
    if policy == "unit":
        assert bool((now.k == 1).all())


def _replay_logprobs(engine: RolloutEngine, prompts, tokens, mask, temperature):
    """Teacher-force the sampled tokens through the engine's model with a fresh cache of the same kind."""
    c = engine.model.cfg
    n = prompts.shape[0]
    max_len = prompts.shape[1] + tokens.shape[1]
    if isinstance(engine.cache, Fp8KVCache):
        cache = Fp8KVCache.from_config(c, n, max_len, dtype=ENGINE_DTYPE, backend="torch")
        cache.set_scales(engine.cache.scales())
    else:
        cache = KVCache(c.n_layer, n, max_len, c.n_kv_head, c.head_dim, dtype=ENGINE_DTYPE)
    with torch.no_grad():
        logits = [engine.model(prompts, cache=cache)[:, -1]]
        for t in range(tokens.shape[1] - 1):
            logits.append(engine.model(tokens[:, t:t + 1], cache=cache, mask=mask[:, t + 1:t + 2])[:, -1])
    logp = torch.log_softmax(torch.stack(logits, 1) / temperature, -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_recorded_logprobs_are_the_sampling_distribution(name, temperature):
    engine = _engine(_policy(1), CONFIGS[name], n=8)
    prompts, _ = _batch(8, seed=3)
    out = engine.generate(prompts, task.answer_len(N_DIGITS), temperature=temperature, eos_id=task.EOS,
                          pad_id=task.PAD, generator=torch.Generator().manual_seed(4))
    replay = _replay_logprobs(engine, prompts, out.tokens, out.mask, temperature)
    m = out.mask
    # The replay feeds the same tokens through the same kernels one step at a time: identical logits.
    torch.testing.assert_close(out.logprobs[m], replay[m], rtol=0, atol=1e-6)
    assert bool((out.logprobs[~m] == 0).all())


def test_first_token_frequencies_match_recorded_probabilities():
    """Sampling 4000 copies of one prompt: the empirical frequency of each first token matches exp(logprob)."""
    n = 4000
    engine = _engine(_policy(2), CONFIGS["fp8+kv"], n=n)
    prompts = _batch(1, seed=5)[0].expand(n, -1).contiguous()
    out = engine.generate(prompts, 1, temperature=1.0, eos_id=task.EOS, pad_id=task.PAD,
                          generator=torch.Generator().manual_seed(6))
    tok, lp = out.tokens[:, 0], out.logprobs[:, 0]
    for t in tok.unique().tolist():
        p = float(lp[tok == t][0].exp())
        assert torch.allclose(lp[tok == t], lp[tok == t][0])  # one distribution for every copy
        freq = float((tok == t).float().mean())
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(freq - p) < 5 * sd + 1e-3, (t, freq, p)  # 5 binomial standard deviations


@pytest.mark.parametrize("kw", [dict(linear="int8"), dict(kv_cache="fp16"), dict(gemm="fast"),
                                dict(kv_policy="magic"), dict(scale_fmt="e8m0")])
def test_bad_engine_config(kw):
    with pytest.raises(ValueError):
        EngineConfig(**kw)


def test_bad_engine_use():
    with pytest.raises(ValueError, match="calib_batch"):
        RolloutEngine(_policy(), CONFIGS["fp8+kv"], batch=2, max_len=16)
    with pytest.raises(ValueError, match="policy"):
        RolloutEngine(torch.nn.Linear(2, 2), CONFIGS["bf16"], batch=2, max_len=16)
    engine = _engine(_policy(), CONFIGS["bf16"], n=4)
    with pytest.raises(ValueError, match="rows"):
        engine.generate(_batch(3)[0], 2, temperature=1.0, eos_id=task.EOS, pad_id=task.PAD,
                        generator=torch.Generator())


@pytest.mark.parametrize("what", ["codes", "scale", "norm"])
def test_weight_sync_audit_stops_a_run_with_a_corrupted_engine_tensor(monkeypatch, what):
    """The audit runs after every sync of every run (GRPOConfig.audit_sync): a sync that leaves one FP8 code, one
    block scale or one bf16 tensor different from the trainer's stops the run, naming the tensor."""
    original = RolloutEngine.sync

    def corrupting_sync(self, policy, calib_batch=None):
        metrics = original(self, policy, calib_batch)
        layer = fp8_linears(self.model)["layers.1.mlp.down_proj"]
        if what == "codes":
            layer.weight.view(torch.uint8)[0, 0] ^= 1  # one code, one bit
        elif what == "scale":
            layer.weight_scale_inv[0, 0] *= 1.0 + 2.0**-20
        else:
            self.model.norm.weight.data[3] += 1.0
        return metrics

    monkeypatch.setattr(RolloutEngine, "sync", corrupting_sync)
    cfg = GRPOConfig(steps=2, n_prompts=2, group_size=2, n_digits=N_DIGITS, eval_every=0)
    match = {"codes": "FP8 codes of 'layers.1.mlp.down_proj.weight'", "scale": "down_proj.weight_scale_inv",
             "norm": "'norm.weight'"}[what]
    with pytest.raises(WeightSyncAuditError, match=match):
        run_grpo(_policy(), CONFIGS["fp8"], CORRECTIONS["none"], cfg, seed=0)


def test_audit_passes_on_a_clean_sync_and_counts_every_tensor():
    trainer = _policy()
    engine = _engine(trainer, CONFIGS["fp8"])
    n = engine.audit(trainer)["engine/audit_tensors"]
    assert n == len(engine.model.state_dict())  # codes + scales of 14 layers, and every other tensor


def test_engine_block_size_reaches_every_fp8_layer():
    trainer = _policy()
    engine = _engine(trainer, EngineConfig(linear="fp8", gemm="exact", block_size=(32, 32)))
    assert {layer.weight_block_size for layer in fp8_linears(engine.model).values()} == {(32, 32)}
    engine.audit(trainer)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(linear="fp8", block_size=(48, 32))
