import os
import random

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers.core import runtime


def test_auto_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv(runtime.BACKEND_ENV, raising=False)
    assert runtime.resolve_backend("auto") == ("triton" if torch.cuda.is_available() else "torch")
    assert runtime.resolve_backend("torch") == "torch"
    assert runtime.resolve_backend("triton") == "triton"


@pytest.mark.parametrize("forced", ["triton", "torch", "TORCH "])
def test_env_var_overrides_auto_only(monkeypatch, forced):
    monkeypatch.setenv(runtime.BACKEND_ENV, forced)
    assert runtime.resolve_backend("auto") == forced.strip().lower()
    # an explicit choice wins over the environment
    other = "torch" if forced.strip().lower() == "triton" else "triton"
    assert runtime.resolve_backend(other) == other


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        runtime.resolve_backend("cuda")
    monkeypatch.setenv(runtime.BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match=runtime.BACKEND_ENV):
        runtime.resolve_backend("auto")


def test_interpreter_is_set_on_cpu_only_machines():
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only machine")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert runtime.triton_interpreted()


def _draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_seed_everything_repeats_all_generators():
    rng_a = runtime.seed_everything(123)
    a = _draws() + (rng_a.random(),)
    rng_b = runtime.seed_everything(123)
    b = _draws() + (rng_b.random(),)
    assert a == b
    runtime.seed_everything(124)
    assert _draws() != a[:3]


def test_seed_everything_seeds_gymnasium_env_and_action_space():
    def rollout(seed):
        env = gym.make("CartPole-v1")
        runtime.seed_everything(seed, env)
        obs0 = env.reset(seed=seed)[0]
        actions = [env.action_space.sample() for _ in range(20)]
        env.close()
        return obs0, actions

    (o1, a1), (o2, a2) = rollout(7), rollout(7)
    np.testing.assert_array_equal(o1, o2)
    assert a1 == a2
    assert rollout(8)[1] != a1 or not np.array_equal(rollout(8)[0], o1)


@pytest.mark.parametrize("bad", [1.5, "3", None, True])
def test_seed_must_be_int(bad):
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(bad)


def test_environment_info_records_versions_and_device():
    info = runtime.environment_info()
    assert info["device"] in ("cpu", "cuda")
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert info["versions"]["triton"]
    assert info["backend"] in ("triton", "torch")
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    text = runtime.describe_environment()
    assert "device:" in text and "torch" in text


def test_git_commit_is_dirty_for_code_changes_but_not_for_results(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "m.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(runtime, "REPO_ROOT", tmp_path)
    commit = runtime.git_commit.__wrapped__  # the cached one answers for the process's own repository
    assert commit() and not commit().endswith("-dirty")
    (tmp_path / "results" / "m.json").write_text('{"new": 1}')
    assert not commit().endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit().endswith("-dirty")
