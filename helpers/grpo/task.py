"""The verifiable task: multi-digit addition with the carry procedure written out, its tokenizer and reward.

A problem is two ``n_digits``-digit numbers ``a`` and ``b``. Digits are written least significant first (the
order in which the carries are computed, so every answer token depends only on the prompt and earlier tokens):

    prompt:   BOS a_0 a_1 ... a_{n-1} + b_0 b_1 ... b_{n-1} =
    answer:   s_0 c_1 s_1 c_2 ... s_{n-1} c_n EOS

with ``s_i = (a_i + b_i + c_i) mod 10`` the sum digit and ``c_{i+1} = (a_i + b_i + c_i) // 10`` the carry out
(``c_0 = 0``). The answer is ``2 n + 1`` tokens: long enough for a per-token rollout mismatch to accumulate over a
sequence, and every token is checkable. Reward: 1 for an exact answer (every token up to and including EOS), else 0.

Vocabulary (:data:`VOCAB`): ``PAD = 0``, ``BOS = 1``, ``EOS = 2``, ``+``, ``=``, then the ten digits.
"""

from __future__ import annotations

import torch

__all__ = ["PAD", "BOS", "EOS", "PLUS", "EQUALS", "DIGIT0", "VOCAB", "VOCAB_SIZE", "prompt_len", "answer_len",
           "sample_problems", "encode_prompts", "encode_answers", "rewards", "decode"]

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
DIGIT0 = 5  # token of digit d is DIGIT0 + d
VOCAB = ("<pad>", "<bos>", "<eos>", "+", "=", *"0123456789")
VOCAB_SIZE = len(VOCAB)


def _check_n(n_digits: object) -> int:
    if isinstance(n_digits, bool) or not isinstance(n_digits, int) or n_digits < 1:
        raise ValueError(f"n_digits must be an int >= 1, got {n_digits!r}")
    return n_digits


def prompt_len(n_digits: int) -> int:
    """Tokens in a prompt: BOS, n digits, '+', n digits, '='."""
    return 2 * _check_n(n_digits) + 3


def answer_len(n_digits: int) -> int:
    """Tokens in a correct answer: n (sum digit, carry) pairs and EOS."""
    return 2 * _check_n(n_digits) + 1


def sample_problems(n: int, n_digits: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` problems as digits long ``[n, 2, n_digits]`` (a, b; least significant digit first), uniform."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return torch.randint(0, 10, (n, 2, _check_n(n_digits)), generator=generator)


def encode_prompts(problems: torch.Tensor) -> torch.Tensor:
    """Prompt tokens long ``[n, prompt_len]`` for ``problems`` ``[n, 2, n_digits]``."""
    if problems.dim() != 3 or problems.shape[1] != 2:
        raise ValueError(f"problems must be [n, 2, n_digits], got {tuple(problems.shape)}")
    n = problems.shape[0]
    col = lambda tok: torch.full((n, 1), tok, dtype=torch.long)  # noqa: E731
    return torch.cat([col(BOS), problems[:, 0] + DIGIT0, col(PLUS), problems[:, 1] + DIGIT0, col(EQUALS)], dim=1)


def encode_answers(problems: torch.Tensor) -> torch.Tensor:
    """The correct answer tokens long ``[n, answer_len]`` (module docstring)."""
    if problems.dim() != 3 or problems.shape[1] != 2:
        raise ValueError(f"problems must be [n, 2, n_digits], got {tuple(problems.shape)}")
    n, _, nd = problems.shape
    out = torch.empty(n, 2 * nd + 1, dtype=torch.long)
    carry = torch.zeros(n, dtype=torch.long)
    for i in range(nd):
        total = problems[:, 0, i] + problems[:, 1, i] + carry
        carry = total // 10
        out[:, 2 * i] = total % 10 + DIGIT0
        out[:, 2 * i + 1] = carry + DIGIT0
    out[:, -1] = EOS
    return out


def rewards(responses: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Exact-match reward fp32 ``[n]``: 1 where ``responses`` long ``[n, T]`` starts with the whole answer
    ``answers`` ``[n, A]`` (EOS included; anything after EOS is padding and ignored), else 0."""
    n, a = answers.shape
    if responses.dim() != 2 or responses.shape[0] != n:
        raise ValueError(f"responses must be [{n}, T], got {tuple(responses.shape)}")
    if responses.shape[1] < a:
        return torch.zeros(n)
    return (responses[:, :a] == answers).all(-1).float()


def decode(tokens: torch.Tensor) -> list[str]:
    """Readable strings for long ``[n, T]`` tokens (padding dropped)."""
    return ["".join(VOCAB[t] for t in row.tolist() if t != PAD) for row in tokens]
