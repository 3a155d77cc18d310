"""Quality floors of the zoo's generators, measured with `digits-features` (issue acceptance and model cards).

- class-conditional pipelines (`digits-sd`, `digits-dit`): fraction of samples classified as the requested digit;
- unconditional `digits-ddpm`: mean top-class probability and the share of each predicted class.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.images import pipeline_output_to_uint8
from ..core.seeding import make_generators
from .data import caption

#: pipelines driven by text prompts (a digit's caption), by class labels, or unconditionally
TEXT_PIPELINES = ("StableDiffusionPipeline", "PixArtAlphaPipeline", "RectifiedFlowPipeline", "FluxPipeline")
LABEL_PIPELINES = ("DiTPipeline",)
UNCONDITIONAL_PIPELINES = ("DDPMPipeline",)
#: the guidance each family samples with when none is given (the values the shipped quality floors used)
#: (FluxPipeline: none, its plain call, one denoiser evaluation per step; a guidance given to a FluxPipeline is true
#: classifier-free guidance, `true_cfg_scale` with the empty negative prompt)
DEFAULT_GUIDANCE = {"StableDiffusionPipeline": 7.5, "DiTPipeline": 4.0}
#: true-CFG scale digits-flux's card also records
FLUX_TRUE_CFG = 4.0
#: steps of the quality floor: 25 DDIM steps, except FluxPipeline's own default (28) and the one-step student
DEFAULT_STEPS = {"digits-flux": 28, "digits-sd-onestep": 1, "digits-flux-onestep": 1}


def flux_call_kwargs(pipe, k: int, guidance: float | None) -> dict:
    """What a FluxPipeline zoo entry needs besides the prompt: its size, its T5 length and true CFG if asked."""
    from ..core.families.flux import text_length_kwargs
    from .architectures import IMAGE_SIZE

    kw = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, **text_length_kwargs(getattr(pipe, "tokenizer_2", None)))
    if guidance is not None and guidance > 1:
        kw.update(true_cfg_scale=guidance, negative_prompt=[""] * k)
    return kw


def num_classes(pipe) -> int | None:
    """Classes a pipeline's labels may name: the DiT's label table, 10 digits for text pipelines, None if none."""
    cls = type(pipe).__name__
    if cls in LABEL_PIPELINES:  # the named classes (id2label) when the pipeline has them, else the embedding table
        ids = set((getattr(pipe, "labels", None) or {}).values())
        return max(ids) + 1 if ids else int(pipe.transformer.config.num_embeds_ada_norm)
    return 10 if cls in TEXT_PIPELINES else None


def call_kwargs(pipe, labels: list[int] | None, prompt: str | None, guidance: float | None) -> tuple[tuple, dict]:
    """Positional and keyword arguments that make `pipe` draw `labels` (or `prompt`); refuses non-pipelines."""
    cls = type(pipe).__name__
    kw: dict = {}
    if cls in TEXT_PIPELINES:
        args: tuple = ([prompt] * len(labels) if prompt else [caption(y) for y in labels],)
        if cls == "PixArtAlphaPipeline":
            kw.update(use_resolution_binning=False, clean_caption=False)
    elif cls in LABEL_PIPELINES:
        args = (list(labels),)
    elif cls in UNCONDITIONAL_PIPELINES:
        args = ()
        kw["batch_size"] = len(labels)
    else:
        raise InputError(f"a {cls} is not a pipeline that samples images")
    if cls == "FluxPipeline":
        return args, {**kw, **flux_call_kwargs(pipe, len(labels), guidance)}
    g = guidance if guidance is not None else DEFAULT_GUIDANCE.get(cls)
    if g is not None and cls not in UNCONDITIONAL_PIPELINES:
        kw["guidance_scale"] = g
    return args, kw


def generate(pipe, labels: list[int] | None, n: int, steps: int, seed: int, batch: int,
             guidance: float | None = None, progress: bool = True, prompt: str | None = None,
             desc: str = "sample") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample `n` images (uint8 NCHW) in batches of `batch` with a progress bar on stderr; image i uses seed
    `seed + i` whatever the batch. `labels` are cycled (None: unconditional or `prompt` only)."""
    if n < 1 or batch < 1 or steps < 1:
        raise InputError(f"need n >= 1, batch >= 1 and steps >= 1, got n={n}, batch={batch}, steps={steps}")
    out, used = [], []
    bar = tqdm(total=n, desc=desc, file=sys.stderr, disable=not progress, unit="img")
    for start in range(0, n, batch):
        k = min(batch, n - start)
        ys = [labels[(start + j) % len(labels)] for j in range(k)] if labels else [0] * k
        used += ys
        args, kw = call_kwargs(pipe, ys, prompt, guidance)
        images = pipe(*args, num_inference_steps=steps, generator=make_generators(seed + start, k),
                      output_type="np", **kw).images
        out.append(pipeline_output_to_uint8(images))
        bar.update(k)
    bar.close()
    return torch.cat(out), (torch.tensor(used) if labels else None)


@torch.no_grad()
def measure_quality(name: str, n: int = 500, steps: int | None = None, seed: int = 0, batch: int = 100,
                    pipe=None, progress: bool = True, guidance: float | None = None) -> dict:
    """Sample `n` images from a zoo generator and score them with the zoo classifier."""
    from . import load
    from .registry import ENTRIES

    steps = steps if steps is not None else DEFAULT_STEPS.get(name, 25)
    if pipe is None:
        if name in ENTRIES and not ENTRIES[name].kind.endswith("Pipeline"):
            raise InputError(f"{name} is a {ENTRIES[name].kind}, not a pipeline: it has no sampling quality; "
                             f"pipelines: {', '.join(e.name for e in ENTRIES.values() if e.kind.endswith('Pipeline'))}")
        pipe = load(name)
    pipe.set_progress_bar_config(disable=True)
    clf = load("digits-features")
    conditional = type(pipe).__name__ not in UNCONDITIONAL_PIPELINES
    labels = list(range(min(10, num_classes(pipe) or 10))) if conditional else None
    images, ys = generate(pipe, labels, n, steps, seed, batch, guidance=guidance, progress=progress,
                          desc=f"sample {name}")
    probs = torch.softmax(clf.logits(images), dim=1)
    pred = probs.argmax(1)
    share = torch.bincount(pred, minlength=10).float() / len(pred)
    res = {"model": name, "n": n, "steps": steps, "seed": seed,
           "mean_top_prob": float(probs.max(1).values.mean()),
           "min_class_share": float(share.min()), "class_share": [round(float(v), 4) for v in share]}
    if ys is not None:
        res["accuracy"] = float((pred == ys).float().mean())
    return res
