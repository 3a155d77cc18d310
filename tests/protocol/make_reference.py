"""Record the images every shipped benchmark configuration gives through the per-method APIs (before the protocol).

    HF_HUB_OFFLINE=1 python tests/protocol/make_reference.py            # writes tests/protocol/reference.npz

Each case below is the way a benchmark script or the demo ran that method before `diffaccel.accelerate` existed
(schedulers swapped by hand, `apply_encoder_propagation` + `cached_call`, `apply_cache_plan`, `FKSteering`,
`best_of_n`, the one-step student pipeline). `test_reference.py` runs the same configurations through
`diffaccel.accelerate` and compares with this file. Two images per case, uint8, at the zoo's native 32x32.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

N = 2  # images per case
SEED = 0
OUT = Path(__file__).resolve().parent / "reference.npz"
SD_PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
DIT_LABELS = [3, 7]


def _uint8(images) -> np.ndarray:
    from diffaccel.core import pipeline_output_to_uint8, to_uint8

    if isinstance(images, torch.Tensor):
        return to_uint8(images.float().cpu()).numpy()
    return pipeline_output_to_uint8(images).numpy()


def _gens(n: int = N, seed: int = SEED) -> list[torch.Generator]:
    from diffaccel.core import make_generators

    return make_generators(seed, n)


def _call(name: str, pipe, call_kwargs: dict) -> np.ndarray:
    out = pipe(**call_kwargs, generator=_gens(), output_type="np")
    return _uint8(out.images)


def sampler_cases() -> dict[str, Callable[[], np.ndarray]]:
    """Every sampler of the samplers benchmark at 10 NFE on digits-ddpm and digits-sd."""
    from diffaccel.samplers import PseudoNumericalScheduler
    from diffaccel.samplers.bench import MODELS, SAMPLERS
    from diffaccel.zoo import load

    cases = {}
    for model in ("digits-ddpm", "digits-sd"):
        for name, builder in SAMPLERS.items():
            if builder(dict(PseudoNumericalScheduler().config), 10) is None:  # cannot spend exactly 10 NFE
                continue
            def run(model=model, builder=builder) -> np.ndarray:
                pipe = load(model)
                pipe.set_progress_bar_config(disable=True)
                pipe.scheduler, steps = builder(dict(pipe.scheduler.config), 10)
                kw = {"num_inference_steps": steps, **MODELS[model]["call_kwargs"]}
                kw.update({"prompt": SD_PROMPTS} if model == "digits-sd" else {"batch_size": N})
                return _call(model, pipe, kw)

            cases[f"{model}|sampler:{name}@nfe10"] = run
    return cases


def ep_cases() -> dict[str, Callable[[], np.ndarray]]:
    """Encoder propagation as the caching benchmark ran it: `apply_encoder_propagation` then `cached_call`
    (default prior noise injection on digits-sd), sequential and parallel decoding."""
    from diffaccel.caching import EncoderPropagationConfig, apply_encoder_propagation, cached_call
    from diffaccel.zoo import load
    from diffusers import DDIMScheduler

    cases = {}
    for model, steps in (("digits-sd", 25), ("digits-ddpm", 25)):
        for schedule in ("sd50-scaled", "uniform-3"):
            for parallel in (False, True):
                def run(model=model, steps=steps, schedule=schedule, parallel=parallel) -> np.ndarray:
                    pipe = load(model)
                    pipe.set_progress_bar_config(disable=True)
                    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
                    cfg = EncoderPropagationConfig(schedule, parallel=parallel)
                    if model == "digits-ddpm":
                        cfg.noise_injection = None
                    apply_encoder_propagation(pipe, cfg)
                    kw = {"prompt": SD_PROMPTS, "guidance_scale": 7.5} if model == "digits-sd" else {"batch_size": N}
                    out = cached_call(pipe, **kw, num_inference_steps=steps, generator=_gens(), output_type="np")
                    return _uint8(out.images)

                cases[f"{model}|ep:{schedule}:{'parallel' if parallel else 'sequential'}@ddim{steps}"] = run
    return cases


def harmonica_cases() -> dict[str, Callable[[], np.ndarray]]:
    """HarmoniCa shipped plans and FORA on digits-dit, 20 DDIM steps, CFG 4 (the HarmoniCa benchmark's setting)."""
    from diffaccel.caching import CachePlan, apply_cache_plan, fora_plan, shipped_plans
    from diffaccel.zoo import load
    from diffusers import DDIMScheduler

    plans: dict[str, Callable] = {}
    for name in ("digits-dit-20-harmonica-b1", "digits-dit-20-harmonica-b2"):
        plans[f"harmonica:{name}"] = lambda pipe, name=name: CachePlan.load(shipped_plans()[name])
    for interval in (2, 3):
        plans[f"fora:{interval}"] = lambda pipe, n=interval: fora_plan(
            20, 2 * len(pipe.transformer.transformer_blocks), n, model=pipe)
    cases = {}
    for key, make_plan in plans.items():
        def run(make_plan=make_plan) -> np.ndarray:
            pipe = load("digits-dit")
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            apply_cache_plan(pipe, make_plan(pipe))
            return _call("digits-dit", pipe, {"class_labels": DIT_LABELS, "num_inference_steps": 20,
                                              "guidance_scale": 4.0})

        cases[f"digits-dit|{key}@ddim20"] = run
    return cases


def steering_cases() -> dict[str, Callable[[], np.ndarray]]:
    """FK steering (k=2, DDIM eta 1, 10 steps) and best-of-2 (DDIM eta 0) on digits-sd and digits-dit, with the
    digits-features classifier reward as in the steering benchmark; the best particle / candidate per prompt."""
    from diffaccel.core import make_generator
    from diffaccel.samplers.steering import ClassifierReward, FKConfig, FKSteering, best_of_n
    from diffaccel.zoo import load
    from diffusers import DDIMScheduler

    cases = {}
    for model in ("digits-sd", "digits-dit"):
        def fk(model=model) -> np.ndarray:
            pipe = load(model)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            reward = ClassifierReward(load("digits-features"))
            cfg = FKConfig(num_particles=2, potential="max", resample_every=3, resample_start=3, resample_end=9)
            gens = _gens(2 * N)
            if model == "digits-sd":
                out = FKSteering(pipe, reward, cfg)(SD_PROMPTS, num_inference_steps=10, generator=gens,
                                                    output_type="pt")
            else:
                out = FKSteering(pipe, reward, cfg)(class_labels=DIT_LABELS, num_inference_steps=10, generator=gens,
                                                    output_type="pt")
            return _uint8(out.images)  # all k particles per prompt, prompt-major

        def bon(model=model) -> np.ndarray:
            pipe = load(model)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            reward = ClassifierReward(load("digits-features"))
            conds = SD_PROMPTS if model == "digits-sd" else DIT_LABELS
            outs = [best_of_n(pipe, c, reward, n=2, num_inference_steps=10, eta=0.0,
                              generator=make_generator(SEED + i)).image for i, c in enumerate(conds)]
            return _uint8(torch.cat(outs))

        cases[f"{model}|fk:k2@ddim10"] = fk
        cases[f"{model}|best-of-n:2@ddim10"] = bon
    return cases


def one_step_cases() -> dict[str, Callable[[], np.ndarray]]:
    """The distilled student as the demo runs it: its own pipeline, one Euler step, no CFG."""
    from diffaccel.zoo import load

    def run() -> np.ndarray:
        pipe = load("digits-sd-onestep")
        pipe.set_progress_bar_config(disable=True)
        return _call("digits-sd-onestep", pipe, {"prompt": SD_PROMPTS, "num_inference_steps": 1})

    return {"digits-sd-onestep|onestep": run}


def all_cases() -> dict[str, Callable[[], np.ndarray]]:
    return {**sampler_cases(), **ep_cases(), **harmonica_cases(), **steering_cases(), **one_step_cases()}


def main() -> int:
    torch.set_num_threads(1)
    images = {}
    with torch.no_grad():
        for name, run in all_cases().items():
            print(f"{name}", file=sys.stderr)
            images[name] = run()
    np.savez_compressed(OUT, **images)
    print(f"wrote {len(images)} cases to {OUT.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
