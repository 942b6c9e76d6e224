"""The batched trainer: N seeds of one method trained together, in lockstep, as one stacked network.

:func:`helpers.m2dqn.dqn.train_dqn` is the readable single-run reference; this module computes the same thing for
N runs at once, so that 10-20 seeds at rl-baselines3-zoo's budgets fit on a 2-core CPU:

* the N online (and target) MLPs are one :class:`StackedQNet` whose layer weights are ``[N, in, out]``, applied with
  ``torch.baddbmm`` on ``[N, rows, in]`` inputs; the summed loss of the N runs gives each run's weights exactly its
  own gradient; Adam is elementwise, so one fused Adam over the stacked tensors is N independent Adams; the
  gradient-norm clip is per run;
* N Gymnasium envs step in lockstep (one per run, seeded as the single-run trainer seeds its env; the loop over them
  is Python, as in ``gymnasium.vector.SyncVectorEnv``, but with the single-run trainer's reset-after-done order);
* each run keeps its own replay sampler and exploration generator, seeded as in ``train_dqn``, so run ``i`` of
  ``train_batched(seeds=[..., s, ...])`` draws the same minibatch indices and makes the same updates as
  ``train_dqn(seed=s)`` (to float rounding: ``bmm`` and ``addmm`` sum in different orders; tests check it).

Also here: the prioritized-replay control (``replay="prioritized"``, :mod:`helpers.m2dqn.per`), which only this
trainer implements.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers.core.timing import single_thread
from helpers.m2dqn.dqn import (BUFFER_SEED_OFFSET, EVAL_SEED_OFFSET, Args, DQNRun, QNetwork, linear_schedule,
                               make_args)
from helpers.m2dqn.per import PrioritySampler, per_beta

__all__ = ["StackedQNet", "StackedReplay", "stacked_td_update", "train_batched"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); the per-run clip uses the same guard.
CLIP_EPS = 1e-6


class StackedQNet(nn.Module):
    """N MLPs of the same shape as one module: ``[N, R, obs_dim] float32 -> [N, R, n_actions]``.

    Layer ``k`` holds ``weights[k]`` ``[N, in, out]`` (``nn.Linear.weight`` transposed) and ``biases[k]``
    ``[N, 1, out]``; ReLU between layers, as :class:`helpers.m2dqn.dqn.QNetwork`.
    """

    def __init__(self, nets: Sequence[QNetwork]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("nets must hold at least one QNetwork")
        layers = [[m for m in net.net if isinstance(m, nn.Linear)] for net in nets]
        shapes = {tuple(tuple(lin.weight.shape) for lin in ls) for ls in layers}
        if len(shapes) != 1:
            raise ValueError(f"nets must all have the same layer shapes, got {sorted(shapes)}")
        depth = len(layers[0])
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[k].weight.detach().T for ls in layers]).contiguous()) for k in range(depth)])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.stack([ls[k].bias.detach() for ls in layers]).unsqueeze(1)) for k in range(depth)])

    @property
    def n_runs(self) -> int:
        return int(self.weights[0].shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[0] != self.n_runs:
            raise ValueError(f"x must have shape [N={self.n_runs}, rows, obs_dim], got {tuple(x.shape)}")
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < last:
                x = torch.relu(x)
        return x

    def run_network(self, i: int) -> QNetwork:
        """Run ``i``'s weights as a plain :class:`QNetwork` (a copy)."""
        dims = [int(self.weights[0].shape[1])] + [int(w.shape[2]) for w in self.weights]
        net = QNetwork(dims[0], dims[-1], dims[1:-1])
        lins = [m for m in net.net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for lin, w, b in zip(lins, self.weights, self.biases):
                lin.weight.copy_(w[i].T)
                lin.bias.copy_(b[i, 0])
        return net


class StackedReplay:
    """N replay ring buffers in lockstep (one transition per run per env step): arrays ``[N, capacity, ...]``.

    Each run samples with its own ``numpy.random.Generator`` seeded ``seeds[i] + BUFFER_SEED_OFFSET`` and the same
    call as :meth:`helpers.m2dqn.dqn.ReplayBuffer.sample`, so its indices equal the single-run buffer's.
    ``per_alpha`` (not None) switches to proportional prioritized sampling (:class:`helpers.m2dqn.per.PrioritySampler`).
    """

    def __init__(self, capacity: int, obs_dim: int, seeds: Sequence[int], per_alpha: float | None = None) -> None:
        if capacity < 1 or obs_dim < 1 or len(seeds) < 1:
            raise ValueError(f"need capacity >= 1, obs_dim >= 1 and >= 1 seed, got {capacity!r}, {obs_dim!r}, "
                             f"{list(seeds)!r}")
        n = len(seeds)
        self.capacity, self.n = int(capacity), n
        self.obs = np.zeros((n, capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((n, capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((n, capacity), dtype=np.int64)
        self.rewards = np.zeros((n, capacity), dtype=np.float32)
        self.dones = np.zeros((n, capacity), dtype=np.float32)
        self.pos, self.size = 0, 0
        self.rngs = [np.random.default_rng(int(s) + BUFFER_SEED_OFFSET) for s in seeds]
        self.per = None if per_alpha is None else [PrioritySampler(capacity, per_alpha, r) for r in self.rngs]

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """One transition per run: ``obs``/``next_obs`` ``[N, obs_dim]``, the others ``[N]``."""
        i = self.pos
        self.obs[:, i], self.next_obs[:, i] = obs, next_obs
        self.actions[:, i], self.rewards[:, i], self.dones[:, i] = actions, rewards, terminated
        if self.per is not None:
            for s in self.per:
                s.added(i)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample_indices(self, batch_size: int, num_batches: int = 1, beta: float = 1.0,
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``[N, M, B]`` per run, and PER importance weights ``[N, M, B]`` (None for uniform sampling)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty StackedReplay")
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size!r}, {num_batches!r}")
        shape = (num_batches, batch_size)
        if self.per is None:
            return np.stack([r.integers(0, self.size, size=shape) for r in self.rngs]), None
        drawn = [s.sample(self.size, shape, beta) for s in self.per]
        return np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn])

    def gather(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Transitions at rows ``idx`` ``[N, M, B]``, flattened per run: ``obs`` ``[N, M*B, obs_dim]``, ..."""
        n, flat = self.n, idx.reshape(self.n, -1)
        run = np.arange(n)[:, None]
        return {"obs": torch.from_numpy(self.obs[run, flat]), "next_obs": torch.from_numpy(self.next_obs[run, flat]),
                "actions": torch.from_numpy(self.actions[run, flat]),
                "rewards": torch.from_numpy(self.rewards[run, flat]), "dones": torch.from_numpy(self.dones[run, flat])}


def _aggregate(batch_losses: torch.Tensor, args: Args) -> torch.Tensor:
    """Per-run loss ``[N]`` from minibatch losses ``[N, M]``: max (gradient through the first maximiser only, as
    :func:`helpers.m2dqn.dqn.max_mean_loss`), tilted (log-mean-exp with ``args.tilt``) or mean."""
    if args.algo != "m2dqn":
        return batch_losses[:, 0]
    if args.loss_agg == "max" or (args.loss_agg == "tilted" and math.isinf(args.tilt)):
        return batch_losses.gather(1, batch_losses.detach().argmax(dim=1, keepdim=True)).squeeze(1)
    if args.loss_agg == "mean" or args.tilt == 0.0:
        return batch_losses.mean(dim=1)
    t, m = float(args.tilt), batch_losses.shape[1]
    return (torch.logsumexp(t * batch_losses, dim=1) - math.log(m)) / t


def stacked_td_update(q_net: StackedQNet, target_net: StackedQNet, optimizer: torch.optim.Optimizer,
                      batch: dict[str, torch.Tensor], args: Args, num_batches: int,
                      is_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One gradient step of every run on ``batch`` (:meth:`StackedReplay.gather`, ``[N, M*B, ...]``).

    The math of :func:`helpers.m2dqn.dqn.td_update` per run; ``is_weights`` ``[N, M*B]`` (PER) weighs the per-sample
    losses. Returns detached ``loss`` ``[N]`` (the optimised loss), ``batch_losses`` ``[N, M]`` (unweighted mean
    TD loss of each minibatch), ``q_sa`` ``[N, M*B]`` and ``td_abs`` ``[N, M*B]`` (|y - Q(s, a)|, PER's priority).
    """
    n, rows = batch["actions"].shape
    m = int(num_batches)
    if rows % m:
        raise ValueError(f"num_batches must divide the rows per run, got {m} and {rows}")
    q_all = q_net(batch["obs"])  # [N, R, A]
    with torch.no_grad():
        q_next = target_net(batch["next_obs"])  # [N, R, A]
        if args.algo == "dqn":
            v_next = q_next.max(dim=2).values
        else:  # Double DQN: the online net picks a*, the target net values it
            a_star = q_net(batch["next_obs"]).argmax(dim=2, keepdim=True)
            v_next = q_next.gather(2, a_star).squeeze(2)
        y = batch["rewards"] + args.gamma * (1.0 - batch["dones"]) * v_next  # [N, R]
    q_sa = q_all.gather(2, batch["actions"].unsqueeze(2)).squeeze(2)  # [N, R]
    if args.td_loss == "huber":
        per_sample = F.smooth_l1_loss(q_sa, y, reduction="none")
    else:
        per_sample = F.mse_loss(q_sa, y, reduction="none")
    batch_losses = per_sample.view(n, m, rows // m).mean(dim=2)  # [N, M]
    if is_weights is None:
        loss = _aggregate(batch_losses, args)
    else:
        loss = (is_weights * per_sample).mean(dim=1)
    optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # run i's weights get only run i's gradient
    params = [p for p in q_net.parameters() if p.grad is not None]
    if args.max_grad_norm > 0:  # torch.nn.utils.clip_grad_norm_, one norm per run
        sq = sum(p.grad.reshape(n, -1).square().sum(dim=1) for p in params)
        coef = (args.max_grad_norm / (sq.sqrt() + CLIP_EPS)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(n, *([1] * (p.ndim - 1))))
    optimizer.step()
    return {"loss": loss.detach(), "batch_losses": batch_losses.detach(), "q_sa": q_sa.detach(),
            "td_abs": (y - q_sa).detach().abs()}


def _make_env(env_id: str, seed: int) -> gym.Env:
    """An env seeded as :func:`helpers.core.runtime.seed_everything` seeds the single-run trainer's."""
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


def _evaluate_all(q_net: StackedQNet, env_id: str, seeds: Sequence[int], episodes: int,
                  envs: list[list[gym.Env]]) -> np.ndarray:
    """Greedy returns ``[N, episodes]``: run ``i``'s episode ``k`` is reset with seed ``seeds[i] + EVAL_SEED_OFFSET
    + k``, as :func:`helpers.m2dqn.dqn.evaluate`; all N x episodes episodes play at once."""
    n = len(seeds)
    obs = np.stack([np.stack([envs[i][k].reset(seed=int(seeds[i]) + EVAL_SEED_OFFSET + k)[0]
                              for k in range(episodes)]) for i in range(n)]).astype(np.float32)  # [N, E, d]
    returns = np.zeros((n, episodes))
    active = np.ones((n, episodes), dtype=bool)
    while active.any():
        with torch.no_grad():
            acts = q_net(torch.from_numpy(obs)).argmax(dim=2).numpy()  # [N, E]
        for i, k in zip(*np.nonzero(active)):
            o, r, term, trunc, _ = envs[i][k].step(int(acts[i, k]))
            returns[i, k] += float(r)
            obs[i, k] = o
            if term or trunc:
                active[i, k] = False
    return returns


def train_batched(env_id: str = "CartPole-v1", seeds: Sequence[int] = (1, 2), **kwargs: Any) -> list[DQNRun]:
    """Train one method (``kwargs`` as for :func:`helpers.m2dqn.dqn.train_dqn`, without ``seed``) for every seed
    in ``seeds`` at once. Returns one :class:`helpers.m2dqn.dqn.DQNRun` per seed, in order, with the same tables;
    its ``charts/SPS`` is the aggregate (all runs' env steps per second of training), ``time/update_ms`` the wall
    time of one batched training call. Also logs ``losses/max_over_mean`` (optimised loss / mean minibatch loss).
    """
    if "seed" in kwargs:
        raise ValueError("pass seeds=[...] to train_batched, not seed")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    args = make_args(env_id, seed=seeds[0], **kwargs)
    with single_thread():  # as train_dqn: one intra-op thread (a second process uses the other core)
        return _train_batched(args, seeds)


def _train_batched(args: Args, seeds: list[int]) -> list[DQNRun]:
    n = len(seeds)
    envs = [_make_env(args.env_id, s) for s in seeds]
    space = envs[0].action_space
    if not isinstance(space, gym.spaces.Discrete) or len(envs[0].observation_space.shape or ()) != 1:
        raise ValueError(f"env_id must have a Discrete action space and flat observations, got {args.env_id!r}")
    obs_dim, n_actions = int(envs[0].observation_space.shape[0]), int(space.n)
    eval_envs = [[gym.make(args.env_id) for _ in range(args.eval_episodes)] for _ in range(n)]
    obs = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, seeds)]).astype(np.float32)  # [N, d]
    explore_rngs = [np.random.default_rng(s) for s in seeds]

    nets, targets = [], []
    for s in seeds:  # each run's initial weights as train_dqn draws them (torch seeded, online then target)
        torch.manual_seed(s)
        nets.append(QNetwork(obs_dim, n_actions, args.hidden))
        targets.append(QNetwork(obs_dim, n_actions, args.hidden))
    q_net = StackedQNet(nets)
    target_net = StackedQNet(nets)
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate, fused=True)
    prioritized = args.replay == "prioritized"
    rb = StackedReplay(args.buffer_size, obs_dim, seeds, per_alpha=args.per_alpha if prioritized else None)

    episodes: list[list[dict[str, float]]] = [[] for _ in range(n)]
    evals: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    losses: list[list[dict[str, float]]] = [[] for _ in range(n)]
    ep_return, ep_len = np.zeros(n), np.zeros(n, dtype=np.int64)
    n_calls, update_s, eval_s = 0, 0.0, 0.0
    eps_duration = args.exploration_fraction * args.total_steps
    last: dict[str, torch.Tensor] = {}

    def run_eval(step: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        rets = _evaluate_all(q_net, args.env_id, seeds, args.eval_episodes, eval_envs)
        for i in range(n):
            evals[i].append({"step": step, "eval/return_mean": float(rets[i].mean()),
                             "eval/return_std": float(rets[i].std()), "eval/returns": rets[i].tolist()})
        eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    for global_step in tqdm(range(1, args.total_steps + 1), disable=not args.progress, mininterval=1.0,
                            desc=f"{args.algo} {args.env_id} x{n}"):
        # -- act: epsilon-greedy, one exploration draw per run (as train_dqn), one batched forward for the greedy
        epsilon = linear_schedule(args.start_e, args.end_e, eps_duration, global_step - 1)
        explore = [r.random() < epsilon for r in explore_rngs]
        greedy = None
        if not all(explore):
            with torch.no_grad():
                greedy = q_net(torch.from_numpy(obs).unsqueeze(1)).argmax(dim=2).squeeze(1).numpy()
        actions = np.array([int(e.action_space.sample()) if explore[i] else int(greedy[i])
                            for i, e in enumerate(envs)], dtype=np.int64)
        next_obs = np.empty_like(obs)
        rewards, terms = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        ends = []
        for i, e in enumerate(envs):
            o, r, term, trunc, _ = e.step(int(actions[i]))
            next_obs[i], rewards[i], terms[i] = o, r, float(term)
            if term or trunc:
                ends.append(i)
        # -- store: bootstrap through truncation, not termination; then reset finished episodes
        rb.add(obs, actions, rewards, next_obs, terms)
        ep_return += rewards
        ep_len += 1
        obs = next_obs
        for i in ends:
            episodes[i].append({"step": global_step, "episode": len(episodes[i]),
                                "charts/episodic_return": float(ep_return[i]),
                                "charts/episodic_length": int(ep_len[i]), "charts/epsilon": epsilon})
            obs[i] = envs[i].reset()[0]
            ep_return[i], ep_len[i] = 0.0, 0

        # -- learn: grad_steps updates of every run, each on M minibatches of B
        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                t = time.perf_counter()
                beta = per_beta(args.per_beta, global_step, args.total_steps)
                for _ in range(args.grad_steps):
                    idx, w = rb.sample_indices(args.batch_size, args.num_batches, beta)
                    last = stacked_td_update(q_net, target_net, optimizer, rb.gather(idx), args, args.num_batches,
                                             None if w is None else torch.from_numpy(w.reshape(n, -1)))
                    if prioritized:
                        td = last["td_abs"].numpy()
                        for i, s in enumerate(rb.per):
                            s.update(idx[i], td[i])
                update_s += time.perf_counter() - t
                n_calls += 1
            if global_step % args.target_update_interval == 0:
                target_net.load_state_dict(q_net.state_dict())
            if global_step % args.log_interval == 0 and last:
                bl = last["batch_losses"]
                for i in range(n):
                    losses[i].append({"step": global_step, "losses/td_loss": float(last["loss"][i]),
                                      "losses/mean_batch_loss": float(bl[i].mean()),
                                      "losses/max_batch_loss": float(bl[i].max()),
                                      "losses/max_over_mean": float(last["loss"][i] / bl[i].mean().clamp_min(1e-12)),
                                      "losses/q_values": float(last["q_sa"][i].mean())})

        if global_step % args.eval_interval == 0 and global_step != args.total_steps:
            run_eval(global_step)
    run_eval(args.total_steps)
    wall = time.perf_counter() - t0
    for e in envs + [e for row in eval_envs for e in row]:
        e.close()

    train_s = wall - eval_s
    shared = {"charts/SPS": n * args.total_steps / max(train_s, 1e-9), "time/train_s": train_s,
              "time/eval_s": eval_s, "time/update_ms": 1e3 * update_s / max(n_calls, 1),
              "train/calls": float(n_calls), "train/grad_steps": float(n_calls * args.grad_steps),
              "train/runs_batched": float(n)}
    out = []
    for i, s in enumerate(seeds):
        out.append(DQNRun(
            episodes=pd.DataFrame(episodes[i], columns=["step", "episode", "charts/episodic_return",
                                                        "charts/episodic_length", "charts/epsilon"]),
            evals=pd.DataFrame(evals[i], columns=["step", "eval/return_mean", "eval/return_std", "eval/returns"]),
            losses=pd.DataFrame(losses[i]),
            metrics={**shared, "eval/final_return": evals[i][-1]["eval/return_mean"]},
            config=asdict(replace(args, seed=s)),
        ))
    return out
