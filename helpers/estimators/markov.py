"""A small autoregressive softmax policy whose exact policy gradient is known, for studying rollout correction.

The policy is a first-order Markov chain over ``V`` tokens: ``pi(x_t | x_{t-1}) = softmax(theta[x_{t-1}])`` with
``theta`` [V + 1, V] (row ``V`` is the BOS state that starts every sequence). The reward of a length-``T`` sequence
is the mean per-token reward ``R(x) = (1/T) sum_t r[x_t]``. Because the chain's token marginals follow the forward
recursion ``p_t = p_{t-1} @ pi`` (O(T V^2)), ``J(theta) = E_pi[R]`` and its exact gradient (autograd through the
recursion) are cheap for T up to thousands, while V^T sequences could never be enumerated (a brute-force
enumeration for tiny V, T checks the recursion in the tests).

The rollout policy ``mu`` uses perturbed logits (:func:`perturb_logits`: Gaussian noise of a given scale, or the
rounding of the logits to FP8 e4m3). Sequences are sampled from ``mu``; the estimators of ``grad J`` (REINFORCE with
the sequence reward shared by every token, as GRPO does) weight each token's score by the rollout-correction
weights of :mod:`helpers.rl.rollout_correction` and are compared with the exact gradient in :func:`estimator_study`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd
import torch

from helpers.core.timing import single_thread
from helpers.fp8.format import fake_quant
from helpers.rl import rollout_correction as rc
from helpers.rl.config import PRESETS, RolloutCorrection, apply_rollout_correction, bypass_policy_loss

__all__ = [
    "ESTIMATORS",
    "CLASSIC",
    "Estimator",
    "log_policy",
    "fp8_round",
    "perturb_logits",
    "sample_sequences",
    "exact_objective",
    "exact_gradient",
    "brute_force_objective",
    "sequence_rewards",
    "estimator_weights",
    "estimator_coefficients",
    "per_sample_gradients",
    "estimator_study",
]

@dataclass(frozen=True)
class Estimator:
    """One gradient estimator: ``kind`` "none" (w = 1), "is" (w = min(ratio, threshold) at ``level``), "mis"
    (w = ratio at ``level``, times the rejection mask keeping ratios in [1/threshold, threshold]) or "corr" (the
    veRL-style :class:`~helpers.rl.config.RolloutCorrection` ``cfg``: decoupled mode through
    :func:`~helpers.rl.config.apply_rollout_correction`, bypass mode through the gradient of
    :func:`~helpers.rl.config.bypass_policy_loss`)."""

    kind: str
    level: str = "token"
    threshold: float = 2.0
    cfg: RolloutCorrection | None = None


# The estimators of the study; C = 2 is FP8-RL's / veRL's default truncation and MIS bound. The "corr" ones are
# veRL's presets at their published thresholds (plus batch-normalised TIS, veRL's rollout_is_batch_normalize).
ESTIMATORS: dict[str, Estimator] = {
    "none": Estimator("none"),
    "token_tis": Estimator("is", "token", 2.0),
    "seq_is": Estimator("is", "sequence", math.inf),
    "seq_tis": Estimator("is", "sequence", 2.0),
    "geo_tis": Estimator("is", "geometric", 2.0),
    "token_mis": Estimator("mis", "token", 2.0),
    "seq_mis": Estimator("mis", "sequence", 2.0),
    "token_icepop": Estimator("corr", cfg=PRESETS["decoupled_token_icepop"]),
    "token_tis_bn": Estimator("corr", cfg=RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0,
                                                            rollout_is_batch_normalize=True)),
    "seq_tis_bn": Estimator("corr", cfg=RolloutCorrection(rollout_is="sequence", rollout_is_threshold=2.0,
                                                          rollout_is_batch_normalize=True)),
    "geo_rs": Estimator("corr", cfg=PRESETS["decoupled_geo_rs"]),
    "k3_rs": Estimator("corr", cfg=PRESETS["decoupled_k3_rs"]),
    "bypass_ppo_clip": Estimator("corr", cfg=PRESETS["bypass_ppo_clip"]),
    "bypass_pg_is": Estimator("corr", cfg=PRESETS["bypass_pg_is"]),
}
# The estimators notebook 03 had before veRL's current set (kept as the "classic" group of its figures).
CLASSIC = ("none", "token_tis", "seq_is", "seq_tis", "geo_tis", "token_mis", "seq_mis")


def log_policy(theta: torch.Tensor) -> torch.Tensor:
    """[V + 1, V] logits -> [V + 1, V] log-probabilities log pi(x | prev) (row V is the BOS state)."""
    return torch.log_softmax(theta, dim=-1)


def fp8_round(x: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Round ``x`` [rows, cols] through FP8 e4m3 and back (:func:`helpers.fp8.format.fake_quant`: the package's
    scale rule ``max(amax, 1e-10) / 448``), with one scale per tensor (``block=None``) or per ``block`` tile (any
    tile shape: the toy tables are smaller than the 16-wide minimum of the production quantizer)."""
    x = x.float()
    if block is None:
        return fake_quant(x, x.abs().amax())
    br, bc = block
    rows, cols = x.shape
    pr, pc = (-rows) % br, (-cols) % bc
    xp = torch.nn.functional.pad(x, (0, pc, 0, pr))  # [R, C] padded to whole tiles (zeros leave amax unchanged)
    tiles = xp.reshape(xp.shape[0] // br, br, xp.shape[1] // bc, bc)  # [R/br, br, C/bc, bc]
    q = fake_quant(tiles, tiles.abs().amax(dim=(1, 3), keepdim=True))
    return q.reshape(xp.shape)[:rows, :cols]


def perturb_logits(theta: torch.Tensor, kind: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """The rollout policy's logits [V + 1, V].

    ``"gaussian"``: ``theta + scale * N(0, 1)`` (one fixed draw for the rollout copy). ``"fp8"``: a perturbation
    shaped like FP8 rounding, ``theta + scale * (fp8_round(theta) - theta)`` - scale 1 is plain e4m3 rounding of
    the logits (per-tensor amax/448 scale), larger scales magnify the same error pattern. ``"none"``: ``theta``."""
    if kind == "none":
        return theta.clone()
    if kind == "gaussian":
        return theta + scale * torch.randn(theta.shape, generator=generator)
    if kind == "fp8":
        return theta + scale * (fp8_round(theta) - theta)
    raise ValueError(f"kind must be one of 'none', 'gaussian', 'fp8', got {kind!r}")


def sample_sequences(logp_table: torch.Tensor, n: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """Sample ``n`` sequences of ``T`` tokens from the chain with log-probs ``logp_table`` [V + 1, V].
    Returns int64 [n, T + 1] whose column 0 is the BOS state V (so ``x[:, :-1]`` are the previous states)."""
    V = logp_table.shape[1]
    cdf = torch.cumsum(logp_table.exp(), dim=-1)  # [V + 1, V]
    cdf[:, -1] = 1.0  # guard against rounding: the last bucket always closes at 1
    u = torch.rand(n, T, generator=generator)
    x = torch.empty(n, T + 1, dtype=torch.long)
    x[:, 0] = V
    for t in range(T):
        x[:, t + 1] = (u[:, t, None] > cdf[x[:, t]]).sum(-1)  # inverse-CDF sampling
    return x


def exact_objective(theta: torch.Tensor, reward: torch.Tensor, T: int) -> torch.Tensor:
    """J(theta) = E_pi[(1/T) sum_t r[x_t]] by the forward recursion of the token marginals (differentiable)."""
    V = theta.shape[1]
    P = torch.softmax(theta, dim=-1)  # [V + 1, V]
    p = P[V]  # marginal of x_1
    J = p @ reward
    for _ in range(T - 1):
        p = p @ P[:V]  # p_{t+1}[v] = sum_u p_t[u] pi(v | u)
        J = J + p @ reward
    return J / T


def exact_gradient(theta: torch.Tensor, reward: torch.Tensor, T: int) -> torch.Tensor:
    """d J / d theta, [V + 1, V], exact (autograd through :func:`exact_objective`)."""
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(exact_objective(th, reward, T), th)
    return g


def brute_force_objective(theta: torch.Tensor, reward: torch.Tensor, T: int) -> torch.Tensor:
    """J(theta) by enumerating all V^T sequences (for tests with tiny V, T only)."""
    V = theta.shape[1]
    logp = log_policy(theta)
    J = theta.new_zeros(())
    for seq in itertools.product(range(V), repeat=T):
        prev, lp = V, theta.new_zeros(())
        for x in seq:
            lp = lp + logp[prev, x]
            prev = x
        J = J + lp.exp() * reward[list(seq)].mean()
    return J


def sequence_rewards(x: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """R(x) = mean_t r[x_t] for sampled ``x`` [n, T + 1] (column 0 is BOS). Returns [n]."""
    return reward[x[:, 1:]].mean(-1)


def estimator_weights(est: Estimator, logp_train: torch.Tensor, logp_rollout: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights [n, T] of estimator ``est`` computed with :mod:`helpers.rl` (for "corr": IS weights times
    the loss mask of :func:`~helpers.rl.config.apply_rollout_correction`, over the whole ``n`` as one batch; bypass
    configs have no advantage-free weight: use :func:`estimator_coefficients`)."""
    if est.kind == "none":
        return mask.float().clone()
    if est.kind == "is":
        return rc.is_weights(logp_train, logp_rollout, mask, level=est.level, threshold=est.threshold)
    if est.kind == "mis":
        w = rc.is_weights(logp_train, logp_rollout, mask, level=est.level, threshold=math.inf)
        return w * rc.rejection_mask(logp_train, logp_rollout, mask, level=est.level, upper=est.threshold)
    if est.kind == "corr" and est.cfg is not None:
        if est.cfg.bypass_mode:
            raise ValueError(f"estimator_weights: a bypass-mode cfg has advantage-dependent weights (PPO clip), use "
                             f"estimator_coefficients; got {est.cfg!r}")
        w, loss_mask, _ = apply_rollout_correction(logp_train, logp_rollout, mask, est.cfg)
        return loss_mask if w is None else w * loss_mask
    raise ValueError(f"est.kind must be 'none', 'is', 'mis' or 'corr' (with cfg), got {est.kind!r}")


def estimator_coefficients(est: Estimator, logp_train: torch.Tensor, logp_rollout: torch.Tensor,
                           mask: torch.Tensor, adv: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Per-token gradient coefficients ``c`` [n, T] of estimator ``est``: its estimate is
    ``sum_t c_t grad log pi(x_t | x_{t-1})`` (the score), and ``c_t`` is the negative derivative of the method's
    per-token loss with respect to ``logp_t``, evaluated where pi_theta = pi_train.

    Decoupled methods: ``c_t = w_t keep_t A`` with the weights and loss mask of :mod:`helpers.rl` (batch-normalised
    weights are normalised per batch of ``batch_size`` sequences, as a trainer would; None: one batch). Bypass methods
    (pi_old := pi_rollout): ``c_t = -d loss_t / d logp_t`` by autograd through
    :func:`~helpers.rl.config.bypass_policy_loss` - for PPO-clip ``A rho_t`` where the ratio pi_theta / pi_rollout is
    not clipped and 0 where it is, for REINFORCE ``A w_t``.

    Args:
        logp_train, logp_rollout: [n, T] log-probs of the sampled tokens under pi_train (= pi_theta here) and mu.
        mask: [n, T] 0/1. adv: [n] advantages (the sequence reward minus a baseline).
    """
    if est.kind != "corr":
        return estimator_weights(est, logp_train, logp_rollout, mask) * adv[:, None]
    if est.cfg is None:
        raise ValueError("est.cfg must be a RolloutCorrection for kind 'corr', got None")
    n = logp_train.shape[0]
    if est.cfg.bypass_mode:
        lp = logp_train.detach().clone().requires_grad_(True)
        loss, _, _ = bypass_policy_loss(lp, logp_rollout, adv, mask, est.cfg)
        (g,) = torch.autograd.grad(loss.sum(), lp)
        return -g
    step = n if batch_size is None or not est.cfg.rollout_is_batch_normalize else int(batch_size)
    out = torch.empty_like(logp_train)
    for i in range(0, n, step):  # chunks matter only for batch normalisation (its mean is per batch)
        sl = slice(i, i + step)
        w, keep, _ = apply_rollout_correction(logp_train[sl], logp_rollout[sl], mask[sl], est.cfg)
        out[sl] = (keep if w is None else w * keep) * adv[sl, None]
    return out


def per_sample_gradients(x: torch.Tensor, coef: torch.Tensor, logp_train_table: torch.Tensor) -> torch.Tensor:
    """sum_t coef[i, t] * d log pi(x_t | x_{t-1}) / d theta for each sequence: [n, V + 1, V].

    The score of a softmax row is ``onehot(x_t) - pi(. | x_{t-1})``, placed in row ``x_{t-1}``.
    """
    n, T1 = x.shape
    S, V = logp_train_table.shape
    prev, cur = x[:, :-1], x[:, 1:]  # [n, T]
    score = torch.nn.functional.one_hot(cur, V).float() - logp_train_table.exp()[prev]  # [n, T, V]
    G = torch.zeros(n, S, V)
    G.scatter_add_(1, prev[..., None].expand(n, T1 - 1, V), coef[..., None] * score)
    return G


def estimator_study(
    theta: torch.Tensor,
    reward: torch.Tensor,
    *,
    lengths: list[int],
    perturbations: list[tuple[str, float]],
    n_samples: int,
    seed: int = 0,
    estimators: dict[str, Estimator] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Bias and variance of each estimator of grad J against the exact gradient, for each T and perturbation.

    For each (T, perturbation) draws ``n_samples`` sequences from the rollout policy and, per estimator, the
    per-sequence gradient ``g_i = sum_t c_it score_it`` with ``c_it = w_it (R_i - J)`` (:func:`estimator_coefficients`) (the baseline J, the exact objective, is a
    constant: it changes no expectation of an untruncated estimator and keeps variances comparable). Returns one
    row per (T, perturbation, estimator) with, relative to ||grad J||:

    * ``rel_bias``: ||mean_i g_i - grad J|| / ||grad J|| (includes Monte-Carlo noise of size ``rel_bias_noise``);
    * ``rel_bias_noise``: sqrt(tr Cov(g) / n) / ||grad J|| - the standard error floor of ``rel_bias``;
    * ``rel_var``: tr Cov(g) / ||grad J||^2 - variance of a single-sequence estimate;
    * ``rel_mse_batch``: rel_bias^2 - noise^2 + rel_var / batch_size (the debiased MSE of a batch-mean estimate);
    * ``cos_mean``: cosine between mean_i g_i and grad J (1 = right direction; Monte-Carlo noise lowers it a little);
    * ``cos_batch``: the mean cosine between a batch-mean estimate (``batch_size`` sequences) and grad J - what one
      update step sees, variance included;
    * the rollout mismatch of that perturbation (``kl``, ``k3_kl``, ``chi2_token``, ``seq_chi2`` = E[rho_seq^2] - 1)
      and the weights' cost (``kept_fraction`` of tokens with nonzero weight, ``ess`` of the weights).
    """
    with single_thread():
        return _study(theta, reward, lengths, perturbations, n_samples, seed,
                      ESTIMATORS if estimators is None else estimators, batch_size)


def _study(theta, reward, lengths, perturbations, n_samples, seed, estimators, batch_size) -> pd.DataFrame:
    gen = torch.Generator().manual_seed(seed)
    logp_pi = log_policy(theta)
    rows = []
    for kind, scale in perturbations:
        logp_mu = log_policy(perturb_logits(theta, kind, scale, gen))
        for T in lengths:
            g_exact = exact_gradient(theta, reward, T)
            J = float(exact_objective(theta, reward, T))
            norm = float(g_exact.norm())
            x = sample_sequences(logp_mu, n_samples, T, gen)
            prev, cur = x[:, :-1], x[:, 1:]
            lp_train, lp_roll = logp_pi[prev, cur], logp_mu[prev, cur]  # [n, T]
            mask = torch.ones_like(lp_train)
            adv = sequence_rewards(x, reward) - J  # [n]
            mm = rc.mismatch_metrics(lp_train, lp_roll, mask)
            seq_ratio = rc.is_weights(lp_train, lp_roll, mask, level="sequence", threshold=math.inf)[:, 0]
            ge = g_exact.reshape(-1)
            for name, est in estimators.items():
                coef = estimator_coefficients(est, lp_train, lp_roll, mask, adv, batch_size=batch_size)
                w = torch.where(adv[:, None] != 0, coef / adv[:, None], torch.zeros_like(coef))  # effective weights
                G = per_sample_gradients(x, coef, logp_pi).reshape(n_samples, -1)
                mean = G.mean(0)
                tr_cov = float(((G - mean) ** 2).sum(1).mean())
                bias2 = float(((mean - ge) ** 2).sum())
                n_b = n_samples // batch_size
                if n_b >= 1:  # cosine of each batch-mean estimate to the exact gradient, averaged over batches
                    gb = G[: n_b * batch_size].reshape(n_b, batch_size, -1).mean(1)  # [n_b, P]
                    cos_batch = float(torch.nn.functional.cosine_similarity(gb, ge[None], dim=-1).mean())
                else:
                    cos_batch = float("nan")
                rows.append({
                    "perturbation": kind, "scale": scale, "T": T, "estimator": name,
                    "rel_bias": math.sqrt(bias2) / norm,
                    "rel_bias_noise": math.sqrt(tr_cov / n_samples) / norm,
                    "rel_var": tr_cov / norm**2,
                    "rel_mse_batch": max(bias2 - tr_cov / n_samples, 0.0) / norm**2 + tr_cov / norm**2 / batch_size,
                    "cos_mean": float(torch.nn.functional.cosine_similarity(mean, ge, dim=0)),
                    "cos_batch": cos_batch,
                    "kept_fraction": float((w != 0).float().mean()),
                    "ess": float(w.mean() ** 2 / (w * w).mean().clamp(min=1e-30)),
                    "kl": mm["kl"], "k3_kl": mm["k3_kl"], "chi2_token": mm["chi2_token"],
                    "seq_chi2": float((seq_ratio**2).mean() - 1.0), "J": J, "grad_norm": norm,
                })
    return pd.DataFrame(rows)
