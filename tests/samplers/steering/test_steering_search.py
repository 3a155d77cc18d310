"""Noise search on tiny stock pipelines: argmax, replay, neighbours, budgets."""

import pytest
import torch
from diffaccel.core import make_generator
from diffaccel.samplers.steering.noise_search import (
    best_of_n,
    path_search,
    replay_path,
    zero_order_neighbours,
    zero_order_search,
)
from tolerances import eps, network_atol
from zoo_pipes import quiet_pipeline

PROMPT = "a handwritten digit seven"
STEPS = 6


@pytest.fixture(scope="module")
def sd():
    return quiet_pipeline("random-sd")


def replay_atol(pipe) -> float:
    """A replay samples one candidate alone where the search batched several: same arithmetic in another blocking,
    so float32 round-off of STEPS UNet calls and one VAE decode separates them."""
    return network_atol(pipe.unet, calls=STEPS) + network_atol(pipe.vae.decoder)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_best_of_n_returns_argmax_and_its_noise_replays(sd):
    out = best_of_n(sd, PROMPT, brightness, n=4, num_inference_steps=STEPS, generator=make_generator(0))
    assert len(out.history[0]) == 4 and out.reward == max(out.history[0])
    assert out.nfe["nfe"] == 4 * STEPS and out.nfe["reward_calls"] == 1
    replay = sd(PROMPT, latents=out.noise, num_inference_steps=STEPS, eta=0.0, output_type="pt").images
    assert torch.allclose(replay, out.image, atol=replay_atol(sd))
    assert brightness(replay, None).item() == pytest.approx(out.reward, abs=replay_atol(sd))


def test_best_of_one_equals_the_base_sample(sd):
    out = best_of_n(sd, PROMPT, brightness, n=1, num_inference_steps=STEPS, generator=make_generator(1))
    base = sd(PROMPT, num_inference_steps=STEPS, eta=0.0, generator=make_generator(1), output_type="pt").images
    assert torch.allclose(out.image, base, atol=replay_atol(sd))


def test_budget_caps_candidates_and_stochastic_samplers_are_rejected(sd):
    out = best_of_n(sd, PROMPT, brightness, n=10, budget_nfe=3 * STEPS + 2, num_inference_steps=STEPS,
                    generator=make_generator(0))
    assert len(out.history[0]) == 3 and out.nfe["nfe"] <= 3 * STEPS + 2
    with pytest.raises(ValueError, match="below the cost"):
        best_of_n(sd, PROMPT, brightness, budget_nfe=STEPS - 1, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="deterministic sampler"):
        best_of_n(sd, PROMPT, brightness, eta=1.0, num_inference_steps=STEPS)


def test_zero_order_neighbours_keep_norm_and_cosine():
    pivot = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    nb = zero_order_neighbours(pivot, 5, 0.95, torch.Generator().manual_seed(1))
    flat, p = nb.reshape(5, -1).double(), pivot.reshape(1, -1).double()
    # built in float64 and rounded once to float32: each element carries <= eps32/2 relative error, which moves
    # a norm or a cosine by at most about eps32
    tol = 4 * eps(torch.float32)
    assert torch.allclose(flat.norm(dim=1), p.norm().expand(5), rtol=tol, atol=0)
    assert torch.allclose(torch.nn.functional.cosine_similarity(flat, p), torch.full((5,), 0.95, dtype=torch.float64),
                          atol=tol, rtol=0)


def test_zero_order_search_climbs_within_budget_and_replays(sd):
    out = zero_order_search(sd, PROMPT, brightness, neighbours=2, rounds=5, budget_nfe=5 * STEPS,
                            num_inference_steps=STEPS, generator=make_generator(2))
    assert len(out.history) == 3 and out.nfe["nfe"] == 5 * STEPS  # pivot + 2 rounds of 2
    assert out.reward == pytest.approx(max(max(h) for h in out.history))
    replay = sd(PROMPT, latents=out.noise, num_inference_steps=STEPS, eta=0.0, output_type="pt").images
    assert torch.allclose(replay, out.image, atol=replay_atol(sd))


def test_path_search_nfe_formula_budget_and_replay(sd):
    kw = dict(n=2, m=2, start=2, delta_f=1, delta_b=2, num_inference_steps=STEPS)
    out = path_search(sd, PROMPT, brightness, generator=make_generator(3), **kw)
    # start: n·start; rounds i = 2 -> 3 -> 4 -> 5 -> 6, each n·m·(Δf + progress) = 4·2
    assert out.nfe["nfe"] == 2 * 2 + 4 * 4 * 2 and len(out.history) == 4 and len(out.path_noises) == 4
    img = replay_path(sd, PROMPT, out.noise, out.path_noises, start=2, delta_f=1, delta_b=2, num_inference_steps=STEPS)
    assert torch.allclose(img, out.image, atol=replay_atol(sd))
    capped = path_search(sd, PROMPT, brightness, generator=make_generator(3), budget_nfe=20, **kw)
    assert capped.nfe["nfe"] <= 20 and len(capped.history) < 4
    img = replay_path(sd, PROMPT, capped.noise, capped.path_noises, start=2, delta_f=1, delta_b=2,
                      num_inference_steps=STEPS)
    assert torch.allclose(img, capped.image, atol=replay_atol(sd))
