"""The rollout engine: its own copy of the policy, refreshed from the trainer after every update (as in veRL).

An engine configuration (:class:`EngineConfig`) fixes what the engine runs in:

* ``linear="bf16"``: every weight in bf16 (the BF16 rollout baseline);
* ``linear="fp8"``: the q/k/v/o and MLP projections as blockwise W8A8 :class:`~helpers.fp8.Fp8Linear` (embeddings,
  lm_head and norms stay bf16, :data:`helpers.fp8.linear.DEFAULT_SKIP`), with the GEMM path ``gemm``;
* ``kv_cache="fp8"``: the per-tensor FP8 KV cache of :mod:`helpers.kvcache` (:class:`~helpers.kvcache.Fp8KVCache`),
  its scales from :func:`~helpers.kvcache.calibrate_kv_scales` with ``kv_policy`` on the policy's schedule
  (``"nemo_rl"``: after every sync; ``"nemo_rl_once"`` / ``"vllm"``: at the first sync only, then stale;
  ``"unit"``: 1.0, never calibrated).

:meth:`RolloutEngine.sync` is the weight sync: it streams the trainer's fp32 tensors one at a time through
:func:`helpers.fp8.requantize_model_` (FP8 layers re-quantized in place, every other tensor ``copy_``-ed with a cast
to bf16), then recalibrates the KV scales on the trainer side, as NeMo-RL does (PR #1212): a no-grad forward of the
trainer's policy over a calibration batch - the last rollout's prompt + response tokens - with hooks on core
attention; the scales ride to the engine with the weights. :meth:`RolloutEngine.generate` samples with the preallocated KV cache and
returns the log-probs of the distribution it sampled from (the engine's own logits at the sampling temperature).

The levers of the mismatch studies (notebook 07), all off by default:

* ``dtype="fp32"``: the engine's high-precision dtype (the zero-mismatch engine: fp32 weights, cache and
  activations, as the trainer);
* ``sync_dtype="bf16"``: the weight sync sends the trainer's tensors rounded to bf16 (what veRL / NeMo-RL send to
  vLLM), so the engine quantizes bf16 weights;
* ``trainer="fp8"``: FP8 end to end - the *trainer's* linear layers run the same blockwise W8A8 forward
  (:mod:`helpers.fp8.fake_quant`, straight-through gradient, fp32 master weights), quantizing
  ``trainer_weight_src`` ("fp32" master or its "bf16" rounding: xtuner's fix when the sync sends bf16);
* ``fp8_layers``: which linear layers the engine (and an FP8 trainer) quantize (:data:`FP8_LAYER_GROUPS`);
* ``kv_quant``: which of K, V, Q the FP8 KV cache rounds through e4m3 (:data:`KV_QUANT`; "kv" is the real
  :class:`~helpers.kvcache.Fp8KVCache`, "qkv" adds its FP8 query, the others the attribution cache
  :class:`~helpers.kvcache.fake.FakeFp8KVCache`);
* ``logit_noise``: Gaussian noise of this standard deviation added to every logit before sampling (drawn from
  the engine's own generator, seeded by ``noise_seed``): a controlled mismatch whose size is set by one number
  (:func:`noise_k1` predicts its k1).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from helpers.fp8.format import DEFAULT_BLOCK, check_block_size, check_scale_fmt
from helpers.fp8.quant import quant_weight
from helpers.fp8.fake_quant import WEIGHT_SOURCES, fake_quant_linears, fake_quantize_model
from helpers.fp8.linear import DEFAULT_SKIP, GEMM_PATHS, fp8_linears, quantize_model, requantize_model_
from helpers.kvcache import Fp8KVCache, calibrate_kv_scales, get_policy
from helpers.kvcache.fake import FakeFp8KVCache
from helpers.models.decoder import Decoder, GenerationOutput

__all__ = ["EngineConfig", "RolloutEngine", "ENGINE_DTYPE", "WeightSyncAuditError", "FP8_LAYER_GROUPS", "KV_QUANT",
           "fp8_skip", "prepare_trainer", "noise_k1", "noise_marginal_kl"]

# The engine's high-precision dtype (what veRL's vLLM rollout runs in): bf16, also for the "BF16 rollout" arm.
ENGINE_DTYPE = torch.bfloat16
LINEARS = ("bf16", "fp8")
KV_CACHES = ("bf16", "fp8")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TRAINERS = ("fp32", "fp8")
# Which linear layers are FP8 (the rest of DEFAULT_SKIP always stays high precision): every one, the attention
# projections, the MLP, or the first / last decoder layer only (NeMo-RL keeps the first and last layers in BF16 as
# an option; the attribution measures what each group contributes).
FP8_LAYER_GROUPS = ("all", "attn", "mlp", "first", "last")
# Which tensors the FP8 KV cache rounds through e4m3.
KV_QUANT = ("kv", "k", "v", "q", "qkv")


def fp8_skip(group: str, n_layer: int) -> Callable[[str, torch.nn.Module], bool]:
    """The skip predicate of :func:`helpers.fp8.quantize_model` for an FP8 layer ``group`` of
    :data:`FP8_LAYER_GROUPS` in a decoder of ``n_layer`` layers (module names ``layers.{i}.self_attn.*`` /
    ``layers.{i}.mlp.*``); :data:`helpers.fp8.DEFAULT_SKIP` is always skipped."""
    if group not in FP8_LAYER_GROUPS:
        raise ValueError(f"fp8_layers must be one of {FP8_LAYER_GROUPS}, got {group!r}")
    default = [re.compile(p) for p in DEFAULT_SKIP]

    def skip(name: str, module: torch.nn.Module) -> bool:
        if any(p.search(name) for p in default):
            return True
        m = re.match(r"layers\.(\d+)\.(self_attn|mlp)\.", name)
        if group == "all":
            return False
        if m is None:
            return True
        layer, part = int(m.group(1)), m.group(2)
        return {"attn": part != "self_attn", "mlp": part != "mlp", "first": layer != 0,
                "last": layer != n_layer - 1}[group]

    return skip


@dataclass(frozen=True)
class EngineConfig:
    """What the rollout engine runs in (module docstring)."""

    linear: str = "bf16"
    """"bf16" or "fp8" (W8A8 blockwise linears)."""
    kv_cache: str = "bf16"
    """"bf16" or "fp8" (FP8 KV cache of helpers.kvcache)."""
    kv_policy: str = "nemo_rl"
    """Scale policy of helpers.kvcache (POLICIES): its schedule says when the scales are recalibrated."""
    scale_fmt: str = "fp32"
    """FP8 linear scale format: "fp32" or "ue8m0" (power-of-two)."""
    gemm: str = "bf16"
    """Fp8Linear GEMM path: "bf16" (dequantized bf16 GEMM, the CPU fast path) or "exact" (block-scaled GEMM)."""
    block_size: tuple[int, int] = DEFAULT_BLOCK
    """FP8 weight block (bn, bk); activations use 1 x bk groups. (128, 128) in every public FP8 checkpoint."""
    dtype: str = "bf16"
    """The engine's high-precision dtype: "bf16" (vLLM's) or "fp32" (the zero-mismatch engine)."""
    sync_dtype: str = "fp32"
    """What the weight sync sends: the trainer's "fp32" tensors, or their "bf16" rounding."""
    trainer: str = "fp32"
    """The trainer's linear layers: "fp32", or "fp8" (FP8 end to end: the engine's W8A8 forward, fake-quantized)."""
    trainer_weight_src: str = "fp32"
    """What an FP8 trainer quantizes: its "fp32" master weights or their "bf16" rounding (xtuner's fix)."""
    fp8_layers: str = "all"
    """Which linear layers are FP8 (FP8_LAYER_GROUPS)."""
    kv_quant: str = "kv"
    """Which tensors an FP8 KV cache rounds through e4m3 (KV_QUANT)."""
    logit_noise: float = 0.0
    """Standard deviation of the Gaussian noise added to every logit before sampling (0: none)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", check_block_size(self.block_size))
        for name, allowed in (("dtype", tuple(DTYPES)), ("sync_dtype", tuple(DTYPES)), ("trainer", TRAINERS),
                              ("trainer_weight_src", WEIGHT_SOURCES), ("fp8_layers", FP8_LAYER_GROUPS),
                              ("kv_quant", KV_QUANT)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.trainer == "fp8" and self.linear != "fp8":
            raise ValueError("trainer='fp8' (FP8 end to end) needs an FP8 engine: linear='fp8'")
        if not (isinstance(self.logit_noise, (int, float)) and 0 <= self.logit_noise < float("inf")):
            raise ValueError(f"logit_noise must be a finite number >= 0, got {self.logit_noise!r}")
        if self.linear not in LINEARS:
            raise ValueError(f"linear must be one of {LINEARS}, got {self.linear!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {self.gemm!r}")
        check_scale_fmt(self.scale_fmt)
        get_policy(self.kv_policy)  # ValueError naming the policy

    @property
    def label(self) -> str:
        """Short name: "bf16", "fp8" (W8A8) or "fp8+kv" (W8A8 + FP8 KV cache); "fp32" for the fp32 engine, "e2e"
        for an FP8 trainer, "+noise" when noise is injected."""
        if self.linear == "bf16":
            base = self.dtype if self.kv_cache == "bf16" else f"{self.dtype}+fp8kv"
        else:
            base = "fp8" if self.kv_cache == "bf16" else "fp8+kv"
        if self.trainer == "fp8":
            base += " e2e"
        return base + (f"+noise{self.logit_noise:g}" if self.logit_noise else "")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def prepare_trainer(trainer: torch.nn.Module, cfg: EngineConfig) -> torch.nn.Module:
    """The trainer's side of ``cfg``: with ``cfg.trainer == "fp8"``, swap its linear layers (the ones the engine
    quantizes) for :class:`~helpers.fp8.fake_quant.Fp8FakeQuantLinear` with the engine's block size and scale
    format, in place (same parameter objects); otherwise leave it. Returns ``trainer``."""
    if cfg.trainer == "fp8":
        fake_quantize_model(trainer, skip=fp8_skip(cfg.fp8_layers, trainer.cfg.n_layer), block_size=cfg.block_size,
                            scale_fmt=cfg.scale_fmt, weight_src=cfg.trainer_weight_src)
    return trainer


def noise_marginal_kl(logits: torch.Tensor, sigma: float, temperature: float = 1.0, *, draws: int = 256,
                      generator: torch.Generator | None = None) -> float:
    """KL(q_bar || p) per row, averaged over the rows of the trainer's logits ``[N, V]``, where ``q_bar =
    E_e softmax((z + s e) / T)`` (Monte Carlo over ``draws`` noise draws) is the distribution a logit-noise engine
    samples from *on average*. The engine records each draw's own log-prob (as a nondeterministic engine does), so
    the k1 it reports is ``E_e KL(softmax((z + s e) / T) || p)`` (:func:`noise_k1`), larger by Jensen's inequality:
    this is the mismatch of the behaviour policy marginalised over the noise."""
    p_log = torch.log_softmax(logits.float() / temperature, -1)
    q = torch.zeros_like(p_log)
    for _ in range(draws):
        e = torch.randn(logits.shape, generator=generator)
        q += torch.softmax((logits.float() + sigma * e) / temperature, -1)
    q /= draws
    return float((q * (q.clamp_min(1e-30).log() - p_log)).sum(-1).mean())


def noise_k1(logits: torch.Tensor, sigma: float, temperature: float = 1.0) -> float:
    """The k1 mismatch (KL(engine || trainer) per token) that logit noise of standard deviation ``sigma``
    produces to second order, for the trainer's logits ``[..., V]``: ``E[KL(softmax((z + s e) / T) ||
    softmax(z / T))] ~ (s / T)^2 / 2 * (1 - sum p^2)`` averaged over the rows (the Fisher form of the KL; the
    noise's variance under p is ``s^2 (1 - sum p^2)``). Exact as ``sigma -> 0``; tests bound its error."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    return float(((sigma / temperature) ** 2 / 2 * (1 - (p * p).sum(-1))).mean())


class WeightSyncAuditError(RuntimeError):
    """The engine's weights after a sync are not a fresh quantization of the trainer's (see
    :meth:`RolloutEngine.audit`): a broken sync, which must stop the run."""


class RolloutEngine:
    """A rollout engine holding its own copy of ``policy`` in the precision of ``cfg``.

    Args:
        policy: the trainer's decoder (fp32); copied, never referenced afterwards.
        cfg: the engine configuration.
        batch: rows per :meth:`generate` call (the KV cache is preallocated for it).
        max_len: prompt + response slots of the cache.
        calib_batch: the first calibration batch of the FP8 KV scales, long ``[n, T]`` ids or ``(ids, mask)``
            (later syncs calibrate on the batch passed to :meth:`sync`); required when ``cfg.kv_cache == "fp8"``.
    """

    def __init__(self, policy: Decoder, cfg: EngineConfig, *, batch: int, max_len: int,
                 calib_batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                 noise_seed: int = 0) -> None:
        if not isinstance(policy, Decoder):
            raise ValueError(f"policy must be a Decoder, got {type(policy).__name__}")
        self.cfg = cfg
        dtype = cfg.torch_dtype
        # A fresh copy (a trainer's fake-quantized layers are its own, not the engine's); its random init must not
        # move the global RNG, so that adding an engine changes nothing else in a run.
        with torch.random.fork_rng(devices=[]):
            model = Decoder(policy.cfg)
        model.load_state_dict(policy.state_dict())
        model = model.to(dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.linear == "fp8":
            quantize_model(model, skip=fp8_skip(cfg.fp8_layers, model.cfg.n_layer), block_size=cfg.block_size,
                           scale_fmt=cfg.scale_fmt, backend="torch", gemm=cfg.gemm)
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.n_calibrations = 0
        self.noise_generator = torch.Generator().manual_seed(noise_seed)
        if cfg.kv_cache == "fp8":
            if calib_batch is None:
                raise ValueError("calib_batch must be given for an FP8 KV cache (its first scales come from it)")
            if cfg.kv_quant in ("kv", "qkv"):
                self.cache = Fp8KVCache.from_config(model.cfg, batch, max_len, dtype=dtype, backend="torch",
                                                    device=model.device, fp8_query=cfg.kv_quant == "qkv")
            else:
                self.cache = FakeFp8KVCache.from_config(model.cfg, batch, max_len, quantize=tuple(cfg.kv_quant),
                                                        dtype=dtype, device=model.device)
        else:
            self.cache = model.new_cache(batch, max_len)
        self.sync(policy, calib_batch)

    @torch.no_grad()
    def sync(self, policy: Decoder, calib_batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> dict[str, float]:
        """Weight sync from the trainer's ``policy``, then (FP8 KV cache, when the policy's schedule says so) the
        KV-scale recalibration on ``calib_batch`` with ``policy``.

        Returns ``engine/sync_s`` and ``engine/recalib_s`` (wall seconds), and the sync's counts
        (``engine/sync_layers``: FP8 layers re-quantized, ``engine/sync_bytes_written``)."""
        t0 = time.perf_counter()
        sync_dtype = DTYPES[self.cfg.sync_dtype]
        stream = ((k, v.detach().to(sync_dtype)) for k, v in policy.state_dict().items())  # one tensor at a time
        m = requantize_model_(self.model, stream)
        t1 = time.perf_counter()
        schedule = get_policy(self.cfg.kv_policy).schedule
        due = schedule == "every_step" or (schedule == "once" and self.n_calibrations == 0)
        if self.cfg.kv_cache == "fp8" and due:
            if calib_batch is None:
                raise ValueError(f"calib_batch must be given: kv_policy {self.cfg.kv_policy!r} recalibrates now")
            self.cache.set_scales(calibrate_kv_scales(policy, [calib_batch], policy=self.cfg.kv_policy))
            self.n_calibrations += 1
        t2 = time.perf_counter()
        return {"engine/sync_s": t1 - t0, "engine/recalib_s": t2 - t1, "engine/sync_layers": float(m["layers"]),
                "engine/sync_bytes_written": float(m["bytes_written"])}

    @torch.no_grad()
    def audit(self, policy: Decoder) -> dict[str, float]:
        """The weight-sync audit (veRL PR #7986 checks the same after each sync): every FP8 layer's codes and
        ``weight_scale_inv`` must equal a fresh quantization of the trainer's weight as the sync sends it (bit for
        bit, with the layer's block size and scale format), and every other engine tensor must equal the trainer's
        cast to the engine dtype. Raises :class:`WeightSyncAuditError` naming the first tensor that differs; returns
        ``engine/audit_tensors`` (tensors checked). With an FP8 trainer it also returns
        ``engine/trainer_code_mismatch``: the fraction of FP8 weight codes (or scales) where the trainer's forward
        and the engine's differ - 0 when both quantize the same tensor, > 0 when the trainer quantizes its fp32
        master and the sync sends bf16 (not an error: the mismatch xtuner measured).

        All tensors are checked: on this model it costs about as much as the sync itself. A real engine would audit
        a sample of layers per step."""
        sync_dtype = DTYPES[self.cfg.sync_dtype]
        state = {k: v.detach().to(sync_dtype) for k, v in policy.state_dict().items()}
        layers = fp8_linears(self.model)
        owned = set()
        for name, layer in layers.items():
            key = f"{name}.weight"
            owned |= {key, f"{name}.weight_scale_inv"}
            q, s = quant_weight(state[key], layer.weight_block_size, scale_fmt=layer.scale_fmt, backend="torch")
            if not torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)):
                raise WeightSyncAuditError(f"weight sync audit: FP8 codes of {key!r} differ from a fresh "
                                           f"quantization of the trainer's weight")
            if not torch.equal(layer.weight_scale_inv, s):
                raise WeightSyncAuditError(f"weight sync audit: {name}.weight_scale_inv differs from a fresh "
                                           f"quantization of the trainer's weight")
        n = 2 * len(layers)
        for key, value in self.model.state_dict().items():
            if key in owned:
                continue
            if key not in state or not torch.equal(value, state[key].to(value.dtype)):
                raise WeightSyncAuditError(f"weight sync audit: engine tensor {key!r} differs from the trainer's")
            n += 1
        out = {"engine/audit_tensors": float(n)}
        trainer_layers = fake_quant_linears(policy)
        if trainer_layers:
            if set(trainer_layers) != set(layers):
                raise WeightSyncAuditError(f"the FP8 trainer quantizes {sorted(trainer_layers)}, the engine "
                                           f"{sorted(layers)}: not the same layers")
            differ = total = 0
            for name, tl in trainer_layers.items():
                q, s = tl.quantized_weight()
                el = layers[name]
                differ += int((q.view(torch.uint8) != el.weight.view(torch.uint8)).sum())
                differ += int((s != el.weight_scale_inv).sum())
                total += q.numel() + s.numel()
            out["engine/trainer_code_mismatch"] = differ / total
        return out

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float, eos_id: int,
                 pad_id: int, generator: torch.Generator) -> GenerationOutput:
        """Sample ``max_new_tokens`` after ``prompts`` long ``[batch, T0]`` with the engine's cache; the log-probs
        are those of the engine's sampling distribution ``softmax(logits / temperature)``."""
        if prompts.shape[0] != self.batch:
            raise ValueError(f"prompts must have {self.batch} rows (the cache's batch), got {prompts.shape[0]}")
        noise = None
        if self.cfg.logit_noise > 0:
            sigma, g = self.cfg.logit_noise, self.noise_generator

            def noise(z: torch.Tensor) -> torch.Tensor:
                return z + (sigma * torch.randn(z.shape, generator=g)).to(z.dtype)

        return self.model.generate(prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id,
                                   generator=generator, cache=self.cache, logits_processor=noise)

    def fp8_layers(self) -> int:
        """Number of FP8 linear layers (0 for a bf16 engine)."""
        return len(fp8_linears(self.model))
