"""Reward protocol: float32 [N], batch = per-item, no grad, errors name the reward."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.samplers.steering import rewards as rw
from tolerances import network_atol


@pytest.fixture(scope="module")
def digits():
    """Real digits (8x8 upsampled to 32x32, [0, 1]) with their labels and captions."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:12], dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = d.target[:12].tolist()
    return x, labels, [zoo.caption(y) for y in labels]


@pytest.fixture(scope="module")
def classifier_reward():
    return rw.ClassifierReward()


def test_classifier_reward_is_log_prob_of_the_prompted_digit(digits, classifier_reward):
    x, labels, prompts = digits
    r = classifier_reward(x, prompts)
    assert r.dtype == torch.float32 and r.shape == (12,) and not r.requires_grad
    assert torch.all(r <= 0)
    wrong = [zoo.caption((y + 1) % 10) for y in labels]
    assert (r > classifier_reward(x, wrong)).float().mean() > 0.8
    per_item = torch.cat([classifier_reward(x[i:i + 1], prompts[i:i + 1]) for i in range(12)])
    # per item vs batched: the classifier's layers sum in another blocking; log-probs are O(|r|)
    assert torch.allclose(r, per_item, atol=network_atol(classifier_reward.classifier, float(r.abs().max())))
    with pytest.raises(ValueError, match="no single digit"):
        classifier_reward(x[:1], ["a cat"])


def test_clip_reward_prefers_the_right_caption(digits):
    x, labels, prompts = digits
    reward = rw.CLIPReward()
    r = reward(x, prompts)
    assert r.shape == (12,) and r.dtype == torch.float32 and torch.all(r.abs() <= 1)
    wrong = [zoo.caption((y + 5) % 10) for y in labels]
    assert (r > reward(x, wrong)).float().mean() > 0.6
    # batch-size round-off only: both CLIP towers (cosine of unit vectors, so magnitude 1)
    atol = network_atol(reward.model)
    assert torch.allclose(r[:3], torch.cat([reward(x[i:i + 1], prompts[i:i + 1]) for i in range(3)]), atol=atol)
    folder = rw.CLIPReward(zoo.entry_path("digits-clip"), batch_size=5)  # any local CLIP folder; micro-batched
    assert torch.allclose(folder(x, prompts), r, atol=atol)


def test_compressibility_reward_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward = rw.CompressibilityReward()
    r = reward(torch.cat([flat, noisy]), ["", ""])
    assert r[0] > r[1] and torch.all(r < 0)
    assert torch.equal(reward(noisy, [""]), r[1:])  # deterministic, batch = per item


def test_callables_constants_and_protocol_errors():
    assert isinstance(rw.ConstantReward(2.0), rw.Reward)
    assert rw.ConstantReward(2.0)(torch.zeros(3, 4, 2, 2), ["a"] * 3).tolist() == [2.0, 2.0, 2.0]
    wrapped = rw.as_reward(lambda im, p: [float(v) for v in im.flatten(1).sum(1)])
    assert isinstance(wrapped, rw.Reward) and wrapped(torch.ones(2, 1, 2, 2), ["", ""]).tolist() == [4.0, 4.0]
    with pytest.raises(rw.RewardError, match="'bad-shape'.*shape"):
        rw.CallableReward(lambda im, p: torch.zeros(len(im) + 1), name="bad-shape")(torch.zeros(2, 1, 2, 2), ["", ""])
    with pytest.raises(rw.RewardError, match="'nanny'.*NaN.*\\[1\\]"):
        rw.score(rw.CallableReward(lambda im, p: torch.tensor([0.0, float("nan")]), name="nanny"),
              torch.zeros(2, 1, 2, 2), ["", ""])
    with pytest.raises(rw.RewardError, match="'listy' returned list"):
        rw.score(type("R", (), {"name": "listy", "input_kind": "tensor01", "__call__": lambda s, i, p: [0.0]})(),
              torch.zeros(1, 1, 2, 2), [""])
    with pytest.raises(TypeError):
        rw.as_reward(3)
