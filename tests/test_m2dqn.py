"""helpers.m2dqn.dqn and grid: losses, replay buffer, update, zoo settings, seeding and input checks."""

import math

import numpy as np
import pytest
import torch

from helpers.m2dqn import dqn, grid
from helpers.m2dqn.dqn import ReplayBuffer, max_mean_loss, tilted_loss

# A short CartPole run: long enough to reach the learning phase and one evaluation, short enough for a test; a small
# net and one gradient step every 4 env steps instead of the zoo's 256x256 and 128 steps every 256.
TINY = dict(total_steps=600, learning_starts=200, eval_interval=300, eval_episodes=2, log_interval=100,
            hidden=(64, 64), train_frequency=4, grad_steps=1, target_update_interval=250)


# -- losses ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_max_mean_loss_is_the_max(m):
    g = torch.Generator().manual_seed(m)
    losses = torch.rand(m, generator=g, dtype=torch.float64)
    assert max_mean_loss(losses).item() == losses.max().item()


def test_max_mean_loss_gradient_goes_to_the_first_maximiser_on_ties():
    losses = torch.tensor([1.0, 3.0, 3.0, 2.0], requires_grad=True)
    max_mean_loss(losses).backward()
    # torch.max() would split the gradient 0.5/0.5 between the tied entries; the argmax index sends it to one.
    assert losses.grad.tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("m,b", [(2, 1), (3, 5), (4, 32)])
def test_parameter_gradient_equals_that_of_the_maximising_batch_alone(m, b):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(m, b, 3, dtype=torch.float64)
    y = torch.randn(m, b, dtype=torch.float64) * torch.arange(1, m + 1, dtype=torch.float64)[:, None]

    def batch_losses():
        return ((net(x.view(m * b, 3)).view(m, b) - y) ** 2).mean(dim=1)  # [M]

    net.zero_grad()
    bl = batch_losses()
    max_mean_loss(bl).backward()
    grads = [p.grad.clone() for p in net.parameters()]

    k = int(bl.argmax())
    net.zero_grad()
    ((net(x[k]).squeeze(1) - y[k]) ** 2).mean().backward()  # batch k's loss, computed on its own
    for g_max, g_k in zip(grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(g_max, g_k, rtol=1e-12, atol=1e-14)  # float64: only summation order differs


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("t", [0.1, 1.0, 5.0])
def test_tilted_loss_matches_direct_formula(m, t):
    losses = torch.linspace(0.2, 2.0, m, dtype=torch.float64)
    direct = math.log(sum(math.exp(t * v) for v in losses.tolist()) / m) / t
    assert tilted_loss(losses, t).item() == pytest.approx(direct, rel=1e-12)


def test_tilted_loss_limits():
    losses = torch.tensor([0.5, 1.0, 4.0, 2.5], dtype=torch.float64)
    assert tilted_loss(losses, 0.0).item() == losses.mean().item()
    assert tilted_loss(losses, math.inf).item() == losses.max().item()
    # t -> 0: mean + (t/2) Var + O(t^2), so the gap shrinks linearly with t
    assert tilted_loss(losses, 1e-6).item() == pytest.approx(losses.mean().item(), abs=1e-5)
    # t -> inf: max - log(M)/t <= tilted <= max
    big = tilted_loss(losses, 1e4).item()
    assert losses.max().item() - math.log(4) / 1e4 - 1e-12 <= big <= losses.max().item()
    # monotone in t between the two
    vals = [tilted_loss(losses, t).item() for t in (0.0, 0.1, 1.0, 10.0, 100.0)]
    assert vals == sorted(vals)


def test_tilted_loss_is_stable_for_large_products():
    losses = torch.tensor([1000.0, 999.0], dtype=torch.float64)
    out = tilted_loss(losses, 10.0)  # exp(10000) overflows; logsumexp does not
    assert math.isfinite(out.item()) and 999.0 < out.item() <= 1000.0


def test_tilted_gradient_is_softmax_weighting():
    losses = torch.tensor([0.3, 0.9, 0.6], dtype=torch.float64, requires_grad=True)
    tilted_loss(losses, 4.0).backward()
    torch.testing.assert_close(losses.grad, torch.softmax(4.0 * losses.detach(), dim=0))


@pytest.mark.parametrize("bad", [torch.zeros(0), torch.zeros(2, 3)])
def test_losses_reject_bad_shapes(bad):
    with pytest.raises(ValueError, match="batch_losses"):
        max_mean_loss(bad)
    with pytest.raises(ValueError, match="batch_losses"):
        tilted_loss(bad, 1.0)
    with pytest.raises(ValueError, match="t must be"):
        tilted_loss(torch.ones(3), -1.0)


# -- replay buffer -----------------------------------------------------------------------------------------------
def _fill(rb: ReplayBuffer, n: int) -> None:
    for i in range(n):
        obs = np.full(rb.obs.shape[1], i, dtype=np.float32)
        rb.add(obs, i % 3, float(i), obs + 1, i % 5 == 0)


def test_buffer_wraps_around_and_keeps_the_newest():
    rb = ReplayBuffer(7, 2, seed=0)
    _fill(rb, 17)
    assert len(rb) == 7 and rb.pos == 17 % 7
    assert sorted(rb.rewards.tolist()) == list(range(10, 17))  # the 7 newest transitions
    assert rb.rewards[17 % 7 - 1] == 16  # the last write sits just before the write position
    np.testing.assert_array_equal(rb.next_obs, rb.obs + 1)
    np.testing.assert_array_equal(rb.dones, (rb.rewards % 5 == 0).astype(np.float32))


@pytest.mark.parametrize("n_added,m,b", [(1, 1, 1), (5, 3, 7), (100, 4, 33)])
def test_buffer_sample_shapes_and_range(n_added, m, b):
    rb = ReplayBuffer(50, 3, seed=1)
    _fill(rb, n_added)
    batch = rb.sample(b, m)
    assert batch.obs.shape == (m, b, 3) and batch.next_obs.shape == (m, b, 3)
    assert batch.actions.shape == batch.rewards.shape == batch.dones.shape == batch.indices.shape == (m, b)
    assert batch.obs.dtype == np.float32 and batch.actions.dtype == np.int64
    assert batch.indices.min() >= 0 and batch.indices.max() < min(n_added, 50)
    np.testing.assert_array_equal(batch.rewards, rb.rewards[batch.indices])  # rows travel together


def test_buffer_sampling_is_seeded():
    a, b, c = ReplayBuffer(40, 2, seed=3), ReplayBuffer(40, 2, seed=3), ReplayBuffer(40, 2, seed=4)
    for rb in (a, b, c):
        _fill(rb, 30)
    ia, ib, ic = (rb.sample(8, 4).indices for rb in (a, b, c))
    np.testing.assert_array_equal(ia, ib)
    assert not np.array_equal(ia, ic)


def test_buffer_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 2)
    rb = ReplayBuffer(4, 2)
    with pytest.raises(ValueError, match="empty"):
        rb.sample(1)
    _fill(rb, 2)
    with pytest.raises(ValueError, match="batch_size"):
        rb.sample(0)
    with pytest.raises(ValueError, match="num_batches"):
        rb.sample(2, 0)


# -- the update --------------------------------------------------------------------------------------------------
def test_double_dqn_target_uses_online_argmax_and_target_value():
    online, target = dqn.QNetwork(2, 3, (4,)), dqn.QNetwork(2, 3, (4,))
    nxt = torch.randn(5, 2)
    r, d = torch.arange(5.0), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])
    y = dqn.td_targets(target, r, nxt, d, 0.9, online(nxt))
    a_star = online(nxt).argmax(1)
    expect = r + 0.9 * (1 - d) * target(nxt)[torch.arange(5), a_star]
    torch.testing.assert_close(y, expect.detach())
    y_dqn = dqn.td_targets(target, r, nxt, d, 0.9)
    torch.testing.assert_close(y_dqn, (r + 0.9 * (1 - d) * target(nxt).max(1).values).detach())


def test_m2dqn_update_steps_on_the_worst_batch():
    """One m2dqn update moves the weights exactly as a ddqn update on the maximising minibatch alone."""
    rb = ReplayBuffer(64, 4, seed=0)
    rng = np.random.default_rng(0)
    for i in range(64):
        rb.add(rng.normal(size=4), int(rng.integers(2)), float(rng.normal() * (1 + i)), rng.normal(size=4), False)
    batch = rb.sample(8, 3)  # [M=3, B=8]

    def fresh(algo, m):
        torch.manual_seed(0)
        q, t = dqn.QNetwork(4, 2), dqn.QNetwork(4, 2)
        args = dqn.make_args("CartPole-v1", algo=algo, num_batches=m, max_grad_norm=0.0)
        return q, t, torch.optim.SGD(q.parameters(), lr=0.1), args

    def one(j):  # minibatch j with leading shape [1, B]
        return dqn.Batch(*(f[j:j + 1] for f in batch))

    # each minibatch's loss at the initial weights, measured by a ddqn step on it alone
    per_batch = [float(dqn.td_update(*fresh("ddqn", 1)[:3], one(j), fresh("ddqn", 1)[3])["losses/td_loss"])
                 for j in range(3)]
    k = int(np.argmax(per_batch))

    q_m2, t_m2, opt_m2, args_m2 = fresh("m2dqn", 3)
    out = dqn.td_update(q_m2, t_m2, opt_m2, batch, args_m2)
    assert float(out["losses/td_loss"]) == pytest.approx(max(per_batch), rel=1e-6)
    q_k, t_k, opt_k, args_k = fresh("ddqn", 1)
    dqn.td_update(q_k, t_k, opt_k, one(k), args_k)
    for p_m2, p_k in zip(q_m2.parameters(), q_k.parameters()):
        torch.testing.assert_close(p_m2, p_k, rtol=1e-6, atol=1e-7)  # fp32: [M*B] vs [B] matmul sum order


# -- training: seeding and bad input ------------------------------------------------------------------------------
def test_same_seed_same_returns_and_different_seed_differs():
    a = dqn.train_dqn("CartPole-v1", algo="m2dqn", num_batches=2, seed=3, **TINY)
    b = dqn.train_dqn("CartPole-v1", algo="m2dqn", num_batches=2, seed=3, **TINY)
    c = dqn.train_dqn("CartPole-v1", algo="m2dqn", num_batches=2, seed=4, **TINY)
    col = "charts/episodic_return"
    np.testing.assert_array_equal(a.episodes[col].to_numpy(), b.episodes[col].to_numpy())
    np.testing.assert_array_equal(a.evals["eval/return_mean"].to_numpy(), b.evals["eval/return_mean"].to_numpy())
    np.testing.assert_array_equal(a.losses["losses/td_loss"].to_numpy(), b.losses["losses/td_loss"].to_numpy())
    assert not np.array_equal(a.episodes["step"].to_numpy(), c.episodes["step"].to_numpy())


def test_train_dqn_outputs():
    run = dqn.train_dqn("CartPole-v1", algo="ddqn", seed=0, **TINY)
    assert list(run.evals["step"]) == [300, 600]
    assert (run.episodes["step"].diff().dropna() > 0).all()
    assert run.episodes["charts/episodic_return"].sum() <= TINY["total_steps"]  # CartPole pays 1 per step
    assert {"charts/SPS", "time/update_ms", "eval/final_return"} <= set(run.metrics)
    assert run.metrics["train/calls"] == run.metrics["train/grad_steps"] == (600 - 200) // 4
    assert list(run.losses["step"]) == [300, 400, 500, 600]


@pytest.mark.parametrize("kwargs,name", [
    (dict(env_id="NoSuchEnv-v9"), "env_id"),
    (dict(algo="sac"), "algo"),
    (dict(algo="m2dqn", num_batches=0), "num_batches"),
    (dict(batch_size=0), "batch_size"),
    (dict(algo="ddqn", num_batches=4), "num_batches"),
    (dict(loss_agg="median"), "loss_agg"),
    (dict(td_loss="l1"), "td_loss"),
    (dict(total_steps=0), "total_steps"),
    (dict(grad_steps=0), "grad_steps"),
    (dict(tilt=-1.0), "tilt"),
    (dict(gamma=1.5), "gamma"),
    (dict(nonsense=1), "nonsense"),
    (dict(replay="prioritized"), "replay"),
    (dict(replay="rank"), "replay"),
])
def test_bad_input_names_the_argument(kwargs, name):
    kwargs = dict(kwargs)
    env_id = kwargs.pop("env_id", "CartPole-v1")
    with pytest.raises(ValueError, match=name):
        dqn.train_dqn(env_id, **kwargs)


def test_method_configs_are_the_fair_controls():
    cfg = grid.method_configs(4, sweep_m=(2, 8))
    assert cfg["M2DQN"] == dict(algo="m2dqn", num_batches=4, loss_agg="max")
    assert cfg["M2DQN M8"]["num_batches"] == 8 and cfg["M2DQN M2"]["num_batches"] == 2
    zoo = dqn.make_args("CartPole-v1")
    assert grid.resolve({"env_id": "CartPole-v1", **cfg["DDQN batch MB"]})[2]["batch_size"] == 4 * zoo.batch_size
    assert grid.resolve({"env_id": "CartPole-v1", **cfg["DDQN M steps"]})[2]["grad_steps"] == 4 * zoo.grad_steps
    assert cfg["DDQN PER"]["replay"] == "prioritized" and cfg["M2DQN tilted"]["loss_agg"] == "tilted"
    for bad in (0, 1, 2.5):
        with pytest.raises(ValueError, match="num_batches"):
            grid.method_configs(bad)
    with pytest.raises(ValueError, match="sweep_m"):
        grid.method_configs(2, sweep_m=(1,))


def test_zoo_settings_are_used_exactly():
    """rl-baselines3-zoo hyperparams/dqn.yml (gradient_steps -1 -> train_freq)."""
    a = dqn.make_args("CartPole-v1")
    assert (a.total_steps, a.learning_rate, a.batch_size, a.buffer_size, a.learning_starts, a.gamma,
            a.target_update_interval, a.train_frequency, a.grad_steps, a.exploration_fraction, a.end_e,
            a.hidden) == (50_000, 2.3e-3, 64, 100_000, 1_000, 0.99, 10, 256, 128, 0.16, 0.04, (256, 256))
    b = dqn.make_args("Acrobot-v1")
    assert (b.total_steps, b.learning_rate, b.batch_size, b.learning_starts, b.target_update_interval,
            b.train_frequency, b.grad_steps) == (100_000, 6.3e-4, 128, 0, 250, 4, 4)
    c = dqn.make_args("MountainCar-v0")
    assert (c.total_steps, c.gamma, c.buffer_size, c.train_frequency, c.grad_steps) == (120_000, 0.98, 10_000, 16, 8)


def test_run_grid_in_process_tags_runs():
    arms = [dict(env_id="CartPole-v1", method=name, seeds=[1, 2], **kw, **TINY)
            for name, kw in grid.method_configs(2).items() if name in ("DDQN", "M2DQN")]
    out = grid.run_grid(arms, jobs=1, progress=False)
    assert set(out["metrics"]["method"]) == {"DDQN", "M2DQN"}
    assert sorted(out["metrics"]["seed"]) == [1, 1, 2, 2]
    assert set(out["evals"].columns) >= {"env_id", "method", "seed", "step", "eval/return_mean"}
    with pytest.raises(ValueError, match="num_batches"):
        grid.run_grid([dict(env_id="CartPole-v1", seeds=[1], algo="m2dqn", num_batches=0)], jobs=1)
    with pytest.raises(ValueError, match="seeds"):
        grid.run_grid([dict(env_id="CartPole-v1", algo="ddqn")], jobs=1)


def test_numpy_policy_tracks_the_live_weights():
    """The acting policy reads the parameters through numpy views: after an optimizer step it must still agree
    with the torch network's argmax."""
    torch.manual_seed(0)
    q = dqn.QNetwork(4, 3, (16, 16))
    act = q.numpy_policy()
    opt = torch.optim.Adam(q.parameters(), lr=0.5, fused=True)
    x = torch.randn(64, 4)
    before = [act(o) for o in x.numpy()]
    q(x)[:, 0].sum().mul(-1.0).backward()  # push action 0 up everywhere
    opt.step()
    after = [act(o) for o in x.numpy()]
    assert after == q(x).argmax(1).tolist()
    assert after != before  # the step changed the greedy actions, and the numpy policy saw it


def test_m2dqn_defaults_to_several_minibatches():
    # M = 1 would silently be plain DDQN
    assert dqn.make_args("CartPole-v1", algo="m2dqn").num_batches == dqn.M2DQN_DEFAULT_M > 1
    assert dqn.make_args("CartPole-v1", algo="m2dqn", num_batches=1).num_batches == 1
    assert dqn.make_args("CartPole-v1", algo="ddqn").num_batches == 1
