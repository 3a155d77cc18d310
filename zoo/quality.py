"""Quality floors of the zoo's generators, measured with `digits-features` (issue acceptance and model cards).

- class-conditional pipelines (`digits-sd`, `digits-dit`): fraction of samples classified as the requested digit;
- unconditional `digits-ddpm`: mean top-class probability and the share of each predicted class.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from ..core.images import pipeline_output_to_uint8
from ..core.seeding import make_generators
from .data import caption

#: guidance each generator is measured (and demonstrated) with; digits-flux: none, FluxPipeline's plain call (one
#: denoiser evaluation per step); its card also records true classifier-free guidance (`true_cfg_scale`) at 4
DEFAULT_GUIDANCE = {"digits-sd": 7.5, "digits-dit": 4.0, "digits-flux": None}
FLUX_TRUE_CFG = 4.0
#: steps of the quality floor: 25 DDIM steps, except digits-flux at FluxPipeline's own default (28)
DEFAULT_STEPS = {"digits-flux": 28}


def flux_call_kwargs(pipe, k: int, guidance: float | None) -> dict:
    """What a FluxPipeline zoo entry needs besides the prompt: its resolution, its T5 length and the guidance."""
    from .architectures import FLUX_MAX_SEQUENCE_LENGTH, IMAGE_SIZE

    kw = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
    if guidance is not None and guidance > 1:
        kw.update(true_cfg_scale=guidance, negative_prompt=[""] * k)
    return kw


def generate(pipe, name: str, labels: list[int] | None, n: int, steps: int, seed: int, batch: int,
             guidance: float | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample `n` images (uint8 NCHW) from a zoo pipeline; image i uses seed `seed + i` whatever the batch."""
    out, used = [], []
    bar = tqdm(total=n, desc=f"sample {name}", file=sys.stderr, disable=not progress, unit="img")
    for start in range(0, n, batch):
        k = min(batch, n - start)
        gens = make_generators(seed + start, k)
        kw = dict(num_inference_steps=steps, generator=gens, output_type="np")
        if labels is not None:
            ys = [labels[(start + j) % len(labels)] for j in range(k)]
            used += ys
        g = guidance if guidance is not None else DEFAULT_GUIDANCE.get(name)
        if name.endswith("sd"):
            images = pipe([caption(y) for y in ys], guidance_scale=g or 7.5, **kw).images
        elif name.endswith("dit"):
            images = pipe(ys, guidance_scale=g or 4.0, **kw).images
        elif name.endswith("flux"):
            images = pipe([caption(y) for y in ys], **flux_call_kwargs(pipe, k, g), **kw).images
        else:
            images = pipe(batch_size=k, **kw).images
        out.append(pipeline_output_to_uint8(images))
        bar.update(k)
    bar.close()
    return torch.cat(out), (torch.tensor(used) if labels is not None else None)


@torch.no_grad()
def measure_quality(name: str, n: int = 500, steps: int | None = None, seed: int = 0, batch: int = 100,
                    pipe=None, progress: bool = True, guidance: float | None = None) -> dict:
    """Sample `n` images from a zoo generator and score them with the zoo classifier."""
    from . import load

    steps = steps if steps is not None else DEFAULT_STEPS.get(name, 25)
    pipe = pipe if pipe is not None else load(name)
    pipe.set_progress_bar_config(disable=True)
    clf = load("digits-features")
    conditional = not name.endswith("ddpm")
    labels = list(range(10)) if conditional else None
    images, ys = generate(pipe, name, labels, n, steps, seed, batch, guidance=guidance, progress=progress)
    probs = torch.softmax(clf.logits(images), dim=1)
    pred = probs.argmax(1)
    share = torch.bincount(pred, minlength=10).float() / len(pred)
    res = {"model": name, "n": n, "steps": steps, "seed": seed,
           "mean_top_prob": float(probs.max(1).values.mean()),
           "min_class_share": float(share.min()), "class_share": [round(float(v), 4) for v in share]}
    if ys is not None:
        res["accuracy"] = float((pred == ys).float().mean())
    return res
