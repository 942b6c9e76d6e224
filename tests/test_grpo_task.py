"""The addition task: tokens, answers with the written-out carries, exact-match reward."""

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.grpo import task


@pytest.mark.parametrize("n_digits", [1, 3, 7])
def test_answers_spell_the_sum_least_significant_first(n_digits):
    g = torch.Generator().manual_seed(n_digits)
    probs = task.sample_problems(50, n_digits, g)
    prompts, answers = task.encode_prompts(probs), task.encode_answers(probs)
    assert prompts.shape == (50, task.prompt_len(n_digits)) and answers.shape == (50, task.answer_len(n_digits))
    for p, a in zip(probs.tolist(), answers.tolist()):
        x = sum(d * 10**i for i, d in enumerate(p[0]))
        y = sum(d * 10**i for i, d in enumerate(p[1]))
        digits = [t - task.DIGIT0 for t in a[:-1]]
        s = sum(d * 10**i for i, d in enumerate(digits[0::2])) + digits[-1] * 10**n_digits  # sum digits + last carry
        assert s == x + y and a[-1] == task.EOS
        assert set(digits[1::2]) <= {0, 1}  # carries


def test_hand_made_problem_and_decode():
    probs = torch.tensor([[[9, 9], [2, 0]]])  # 99 + 2 = 101, digits least significant first
    assert task.decode(task.encode_prompts(probs)) == ["<bos>99+20="]
    assert task.decode(task.encode_answers(probs)) == ["1101<eos>"]  # s0=1 c1=1, s1=0 c2=1


def test_rewards_exact_match_ignores_padding_after_eos():
    probs = torch.tensor([[[1, 2], [3, 4]]] * 3)
    ans = task.encode_answers(probs)
    resp = torch.cat([ans, torch.zeros(3, 2, dtype=torch.long)], 1)
    resp[1, 0] = task.DIGIT0  # a wrong first digit
    resp[2, ans.shape[1] - 1] = task.PAD  # no EOS
    assert task.rewards(resp, ans).tolist() == [1.0, 0.0, 0.0]
    assert task.rewards(resp[:, :2], ans).tolist() == [0.0, 0.0, 0.0]  # too short to hold the answer


@pytest.mark.parametrize("call", [
    lambda: task.sample_problems(0, 3, torch.Generator()),
    lambda: task.sample_problems(2, 0, torch.Generator()),
    lambda: task.prompt_len(True),
    lambda: task.encode_prompts(torch.zeros(2, 3, 4, dtype=torch.long)),
    lambda: task.encode_answers(torch.zeros(2, 2, dtype=torch.long)),
    lambda: task.rewards(torch.zeros(3, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)),
])
def test_bad_inputs(call):
    with pytest.raises(ValueError):
        call()
