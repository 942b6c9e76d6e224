"""One entry point for rollout correction, in veRL's vocabulary: a config, veRL's presets, and two calls.

veRL (``verl/trainer/config/algorithm.py`` ``RolloutCorrectionConfig``; docs ``docs/algo/rollout_corr.md``) has two
modes:

* **decoupled** (``bypass_mode=False``): three policies - pi_rollout (the engine that sampled), pi_old (the trainer's
  recomputed log-probs, veRL's ``old_log_probs``) and pi_theta (being optimised). The IS weights
  pi_old / pi_rollout and the rejection mask come from :func:`apply_rollout_correction`, before the loss; the PPO
  loss then clips pi_theta / pi_old as usual (:func:`helpers.rl.losses.clipped_surrogate` with
  ``rollout_weights=weights`` and ``mask=loss_mask``).
* **bypass** (``bypass_mode=True``): pi_old := pi_rollout, so the trainer skips its old-log-prob forward pass. The
  correction happens inside the loss, from the current log-probs (:func:`bypass_policy_loss`): ``loss_type=
  "ppo_clip"`` clips pi_theta / pi_rollout (the PPO ratio *is* the IS weight, no explicit weight), ``"reinforce"`` is
  a policy gradient ``-A w log pi_theta`` with explicit detached weights w = pi_theta / pi_rollout (``rollout_is``,
  truncated / IcePop as configured) and no clip. Rejection (``rollout_rs``) applies in both, on pi_theta / pi_rollout.

veRL's tensors map to this API's arguments: ``old_log_probs`` -> ``logp_old`` (``logp_train`` in the lower-level
functions), ``rollout_log_probs`` -> ``logp_rollout``, ``response_mask`` -> ``mask``; the returned ``loss_mask`` is
veRL's modified ``response_mask`` and ``weights`` its ``rollout_is_weights``.

Besides veRL's fields, two optional rules from the other stacks (None = off): ``slime_veto_threshold`` (slime: drop a
sequence with any token ratio below it) and ``seq_logprob_error_threshold`` (NeMo-RL: drop a sequence whose mean
exp|logp_gen - logp_train| exceeds it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from helpers.rl import rejection as rj
from helpers.rl import rollout_correction as rc
from helpers.rl.common import check_advantages, check_logps, check_positive
from helpers.rl.losses import CLIP, clipped_surrogate

__all__ = ["RolloutCorrection", "PRESETS", "LOSS_TYPES", "preset", "apply_rollout_correction", "bypass_policy_loss"]

LOSS_TYPES = frozenset({"ppo_clip", "reinforce"})
METRIC_PREFIX = "rollout_corr/"


@dataclass(frozen=True)
class RolloutCorrection:
    """veRL's ``RolloutCorrectionConfig`` (same field names and defaults), validated on construction."""

    rollout_is: str | None = "sequence"  # IS level: "token", "sequence" ("geometric": this project's), None = no IS
    rollout_is_threshold: float | str = 2.0  # C (TIS: min(w, C)) or "lower_upper" (IcePop: 0 outside the band)
    rollout_is_batch_normalize: bool = False  # rescale the weights to mean 1 over the batch, after truncation
    rollout_rs: str | None = None  # rejection options, e.g. "seq_mean_k3" or "token_k1,seq_max_k3"; None = none
    rollout_rs_threshold: float | str | None = None  # per option: "lower_upper" / U for k1, an upper bound for k2/k3
    bypass_mode: bool = False  # pi_old := pi_rollout (no old-log-prob forward); the loss does the correction
    loss_type: str = "ppo_clip"  # bypass mode's loss: "ppo_clip" or "reinforce"
    slime_veto_threshold: float | None = None  # slime's veto (e.g. 1e-4); not a veRL field
    seq_logprob_error_threshold: float | None = None  # NeMo-RL's per-sequence error mask (e.g. 1.5); not veRL's

    def __post_init__(self) -> None:
        if self.rollout_is is not None:
            if self.rollout_is not in rc.IS_LEVELS:
                raise ValueError(f"rollout_is must be None or one of {sorted(rc.IS_LEVELS)}, got {self.rollout_is!r}")
            rc.parse_is_threshold(self.rollout_is_threshold)
        if not isinstance(self.rollout_is_batch_normalize, bool):
            raise ValueError(f"rollout_is_batch_normalize must be a bool, got {self.rollout_is_batch_normalize!r}")
        if self.rollout_rs is not None:
            rj.parse_rs_thresholds(self.rollout_rs, self.rollout_rs_threshold)
        elif self.rollout_rs_threshold is not None:
            raise ValueError(f"rollout_rs_threshold={self.rollout_rs_threshold!r} needs rollout_rs (got None)")
        if not isinstance(self.bypass_mode, bool):
            raise ValueError(f"bypass_mode must be a bool, got {self.bypass_mode!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "reinforce" and not self.bypass_mode:
            raise ValueError("loss_type='reinforce' applies in bypass mode only (set bypass_mode=True); decoupled "
                             "mode uses the PPO-clip loss with the IS weights")
        if self.bypass_mode and self.loss_type == "ppo_clip" and self.rollout_is is not None:
            raise ValueError(f"rollout_is must be None with bypass_mode and loss_type='ppo_clip' (the PPO ratio "
                             f"pi_theta / pi_rollout is the IS weight), got rollout_is={self.rollout_is!r}")
        for name in ("slime_veto_threshold", "seq_logprob_error_threshold"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))

    def replace(self, **changes: object) -> "RolloutCorrection":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown RolloutCorrection fields {sorted(unknown)}")
        return RolloutCorrection(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


# veRL's presets (the classmethods of RolloutCorrectionConfig, same names and default thresholds).
PRESETS: dict[str, RolloutCorrection] = {
    "disabled": RolloutCorrection(rollout_is=None, rollout_rs=None),
    "decoupled_token_is": RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0),
    "decoupled_seq_is": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0),
    "decoupled_token_icepop": RolloutCorrection(rollout_is="token", rollout_is_threshold="0.5_5.0"),
    "decoupled_seq_is_rs": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0,
                                             rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),  # Seq-MIS
    "decoupled_geo_rs": RolloutCorrection(rollout_is=None, rollout_rs="seq_mean_k1",
                                          rollout_rs_threshold="0.999_1.001"),  # Geo-RS
    "decoupled_geo_rs_token_tis": RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0,
                                                    rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001"),
    "decoupled_geo_rs_seq_tis": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0,
                                                  rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001"),
    "decoupled_k3_rs": RolloutCorrection(rollout_is=None, rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01),
    "decoupled_k3_rs_token_tis": RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0,
                                                   rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01),
    "decoupled_k3_rs_seq_tis": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0,
                                                 rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01),
    "bypass_ppo_clip": RolloutCorrection(rollout_is=None, bypass_mode=True, loss_type="ppo_clip"),
    "bypass_ppo_clip_geo_rs": RolloutCorrection(rollout_is=None, rollout_rs="seq_mean_k1",
                                                rollout_rs_threshold="0.999_1.001", bypass_mode=True),
    "bypass_ppo_clip_k3_rs": RolloutCorrection(rollout_is=None, rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01,
                                               bypass_mode=True),
    "bypass_pg_is": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0, bypass_mode=True,
                                      loss_type="reinforce"),
    "bypass_pg_token_icepop": RolloutCorrection(rollout_is="token", rollout_is_threshold="0.5_5.0", bypass_mode=True,
                                                loss_type="reinforce"),
    "bypass_pg_geo_rs": RolloutCorrection(rollout_is=None, rollout_rs="seq_mean_k1",
                                          rollout_rs_threshold="0.999_1.001", bypass_mode=True, loss_type="reinforce"),
    "bypass_pg_geo_rs_token_tis": RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0,
                                                    rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001",
                                                    bypass_mode=True, loss_type="reinforce"),
    "bypass_pg_geo_rs_seq_tis": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0,
                                                  rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001",
                                                  bypass_mode=True, loss_type="reinforce"),
}


def preset(name: str, **changes: object) -> RolloutCorrection:
    """``PRESETS[name]``, optionally with some fields changed (e.g. ``preset("decoupled_k3_rs",
    rollout_rs_threshold=0.005)``)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]


def _check_cfg(cfg: object) -> RolloutCorrection:
    if isinstance(cfg, str):
        return preset(cfg)
    if not isinstance(cfg, RolloutCorrection):
        raise ValueError(f"cfg must be a RolloutCorrection or a preset name, got {type(cfg).__name__}")
    return cfg


def _reject(cfg: RolloutCorrection, logp_a: torch.Tensor, logp_rollout: torch.Tensor, m: torch.Tensor
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Every configured rejection rule, ANDed. Returns the kept mask and the rules' metrics."""
    kept, metrics = m, {}
    if cfg.rollout_rs is not None:
        k, met = rj.rollout_rs_mask(logp_a, logp_rollout, m, cfg.rollout_rs, cfg.rollout_rs_threshold)
        kept, metrics = kept * k, {**metrics, **met}
    if cfg.slime_veto_threshold is not None:
        k, met = rj.slime_veto_mask(logp_a, logp_rollout, m, cfg.slime_veto_threshold)
        kept, metrics = kept * k, {**metrics, **met}
    if cfg.seq_logprob_error_threshold is not None:
        k, met = rj.seq_logprob_error_mask(logp_a, logp_rollout, m, cfg.seq_logprob_error_threshold)
        kept, metrics = kept * k, {**metrics, **met}
    return kept, metrics


@torch.no_grad()
def apply_rollout_correction(
    logp_old: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    cfg: RolloutCorrection | str,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """The whole rollout correction of one batch, before the loss (veRL's
    ``compute_rollout_correction_and_rejection_mask``).

    Args:
        logp_old: [batch, seq] float log-probs of the sampled tokens under the trainer (veRL's ``old_log_probs``;
            in bypass mode pass the rollout log-probs, as veRL does).
        logp_rollout: [batch, seq] float, the same under the rollout engine (``rollout_log_probs``).
        mask: [batch, seq] bool or 0/1 float (``response_mask``); padding may hold NaN.
        cfg: a :class:`RolloutCorrection` or a key of :data:`PRESETS`.

    Returns:
        ``(weights, loss_mask, metrics)``:

        * weights: [batch, seq] float32 detached IS weights that multiply the per-token policy-gradient loss
          (IcePop: zeros outside the band, mask unchanged), or None when ``rollout_is`` is None or in bypass mode
          (where :func:`bypass_policy_loss` computes them from the current log-probs);
        * loss_mask: [batch, seq] float32, ``mask`` minus the rejected tokens / sequences (decoupled mode; in bypass
          mode rejection happens in :func:`bypass_policy_loss` and this is ``mask``) - use it as the loss mask, so
          rejected tokens leave the denominator;
        * metrics: floats named ``rollout_corr/<name>``: every :func:`~helpers.rl.rollout_correction.
          mismatch_metrics` key, the IS metrics of :func:`~helpers.rl.rollout_correction.rollout_is_weights`,
          the rejection metrics of :mod:`helpers.rl.rejection`, and ``rollout_corr/rejected_fraction_token`` /
          ``_sequence`` (:func:`~helpers.rl.rollout_correction.rejection_metrics`). NaN where undefined (all-masked
          batch).
    """
    cfg = _check_cfg(cfg)
    m = check_logps(mask, logp_old=logp_old, logp_rollout=logp_rollout)
    metrics = dict(rc.mismatch_metrics(logp_old, logp_rollout, m))
    weights, loss_mask = None, m
    if not cfg.bypass_mode:
        if cfg.rollout_is is not None:
            weights, met = rc.rollout_is_weights(logp_old, logp_rollout, m, cfg.rollout_is, cfg.rollout_is_threshold,
                                                 cfg.rollout_is_batch_normalize)
            metrics.update(met)
        loss_mask, met = _reject(cfg, logp_old, logp_rollout, m)
        metrics.update(met)
    if bool((m > 0).any()):
        metrics.update(rc.rejection_metrics(m, loss_mask))
    else:
        metrics.update({"rejected_fraction_token": float("nan"), "rejected_fraction_sequence": float("nan")})
    return weights, loss_mask, {METRIC_PREFIX + k: v for k, v in metrics.items()}


def bypass_policy_loss(
    logp: torch.Tensor,
    logp_rollout: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: RolloutCorrection | str,
    *,
    clip_low: float = CLIP,
    clip_high: float | None = None,
    clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The per-token policy loss of veRL's bypass mode (pi_old := pi_rollout), corrections included.

    * ``loss_type="ppo_clip"``: :func:`~helpers.rl.losses.clipped_surrogate` of ``logp`` against ``logp_rollout``
      (ratio pi_theta / pi_rollout, clipped to [1 - clip_low, 1 + clip_high]; dual clip with ``clip_c``);
    * ``loss_type="reinforce"``: ``l_t = -A_t w_t logp_t`` with ``w`` = :func:`~helpers.rl.rollout_correction.
      rollout_is_weights` of (logp detached, logp_rollout) at ``cfg.rollout_is`` (1 when None), detached, no clip.
      Its gradient is ``-A_t w_t grad log pi_theta``, i.e. ``-A_t grad (pi_theta / pi_rollout)`` where w is untruncated.

    Rejection (``rollout_rs`` and the optional vetoes) is computed on (logp detached, logp_rollout) and removes
    tokens from the returned ``loss_mask``.

    Args:
        logp: [batch, seq] log-probs under pi_theta (carries the gradient).
        logp_rollout: [batch, seq] the rollout engine's log-probs (veRL's ``rollout_log_probs``).
        advantages: [batch, seq] or [batch] (one per sequence); detached.
        mask: [batch, seq] bool or 0/1 (``response_mask``).
        cfg: a bypass-mode :class:`RolloutCorrection` or preset name.
        clip_low, clip_high, clip_c: PPO-clip settings (ignored by ``"reinforce"``).

    Returns:
        ``(loss_mat, loss_mask, metrics)``: loss_mat [batch, seq] float32, 0 where ``loss_mask`` is 0 - aggregate
        it with :func:`helpers.rl.losses.agg_loss` (``loss_mat, loss_mask``); metrics floats named
        ``rollout_corr/<name>`` (mismatch of pi_theta vs pi_rollout, IS and rejection metrics, and ``clipfrac`` for
        PPO-clip).
    """
    cfg = _check_cfg(cfg)
    if not cfg.bypass_mode:
        raise ValueError(f"cfg must have bypass_mode=True for bypass_policy_loss, got {cfg!r}; in decoupled mode use "
                         "apply_rollout_correction and clipped_surrogate")
    m = check_logps(mask, logp=logp, logp_rollout=logp_rollout)
    advantages = check_advantages(advantages, logp)
    lp_det = logp.detach()
    metrics = dict(rc.mismatch_metrics(lp_det, logp_rollout, m))
    loss_mask, met = _reject(cfg, lp_det, logp_rollout, m)
    metrics.update(met)
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    keep = loss_mask > 0
    if cfg.loss_type == "ppo_clip":
        loss, met = clipped_surrogate(logp, logp_rollout, advantages, loss_mask, clip_low=clip_low,
                                      clip_high=clip_high, clip_c=clip_c)
        metrics.update({k: float(v) for k, v in met.items()})
    else:
        if cfg.rollout_is is None:
            w = m
        else:
            w, met = rc.rollout_is_weights(lp_det, logp_rollout, m, cfg.rollout_is, cfg.rollout_is_threshold,
                                           cfg.rollout_is_batch_normalize)
            metrics.update(met)
        adv = torch.where(keep, advantages.detach().float(), zero)
        lp = torch.where(keep, logp.float(), zero)
        loss = torch.where(keep, -adv * w.detach() * lp, zero)
    if bool((m > 0).any()):
        metrics.update(rc.rejection_metrics(m, loss_mask))
    return loss, loss_mask, {METRIC_PREFIX + k: v for k, v in metrics.items()}
