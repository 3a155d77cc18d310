"""Caches under regional torch.compile: cache decisions stay outside the compiled blocks (0 graph breaks there)."""

from __future__ import annotations

import pytest
import torch
from diffaccel.caching import (
    EncoderPropagationConfig,
    apply_branch_reuse,
    apply_encoder_propagation,
    cached_call,
    deepcache_plan,
    remove_branch_reuse,
    remove_encoder_propagation,
)
from diffaccel.zoo import load
from diffusers import DDIMScheduler

STEPS = 4


@pytest.fixture
def pipe():
    p = load("random-sd")
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    yield p
    for m in p.unet.modules():  # undo the regional compilation
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def _call(pipe):
    return cached_call(pipe, prompt=["a handwritten digit one"], generator=torch.Generator().manual_seed(0),
                       num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt").images


@pytest.mark.parametrize("method", ["branch-reuse", "encoder-propagation"])
def test_no_graph_break_inside_the_compiled_blocks(pipe, method):
    from torch._dynamo.utils import counters

    eager = None
    if method == "branch-reuse":
        apply_branch_reuse(pipe, deepcache_plan(STEPS, pipe.unet, 2, 0))
    else:
        apply_encoder_propagation(pipe, EncoderPropagationConfig(key_steps=[0, 2], noise_injection=None))
    try:
        eager = _call(pipe)
        torch._dynamo.reset()
        counters.clear()
        # diffusers' regional compilation: only the repeated transformer blocks; the backend "eager" runs dynamo's
        # tracing (where graph breaks happen) without code generation
        pipe.unet.compile_repeated_blocks(backend="eager", fullgraph=True)
        first = _call(pipe)
        graphs_after_one = counters["stats"]["unique_graphs"]
        second = _call(pipe)
        assert sum(counters["graph_break"].values()) == 0  # fullgraph=True would also have raised on a break
        assert graphs_after_one >= 1
        # the cache decision is not a guard of the compiled blocks: a second generation compiles nothing new
        assert counters["stats"]["unique_graphs"] == graphs_after_one
    finally:
        (remove_branch_reuse if method == "branch-reuse" else remove_encoder_propagation)(pipe)
    # dynamo with the eager backend runs the same kernels: same images as without compilation
    assert torch.equal(first, second) and torch.allclose(first, eager, atol=1e-6)
