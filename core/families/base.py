"""`PipelineFamily`: what differs between pipeline families, written once and used by every method.

A family adapter answers, for one kind of diffusers pipeline, the questions every acceleration used to re-derive:
which module is the denoiser, what conditions it (text, class label, nothing), how classifier-free guidance is
batched, the default guidance scale, the call arguments of one generation, and — for the sampling loops diffaccel
owns (FK steering, noise search, router training) — `condition`, `init_latents`, `eps` and `decode` on the
pipeline's *own* modules. Add a family by subclassing and decorating with `families.register_family`; methods never
test pipeline classes themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch


class PipelineFamily:
    """Base adapter. Class attributes describe the family; methods act on the wrapped pipeline."""

    #: short name used in recipes, the demo and benchmark records
    name: ClassVar[str] = ""
    #: pipeline class names this adapter serves (matched against the pipeline's MRO, so subclasses match)
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: attribute of the pipeline holding the network called once per step
    denoiser_attr: ClassVar[str] = "unet"
    #: "text", "class" or "none"
    conditioning_kind: ClassVar[str] = "none"
    #: the pipeline's own default guidance scale (None: no classifier-free guidance)
    default_guidance: ClassVar[float | None] = None
    #: the pipeline exposes `callback_on_step_end` with a `latents` tensor input
    has_step_callback: ClassVar[bool] = False
    #: the pipeline passes `eta` / `generator` on to `scheduler.step`
    forwards_step_kwargs: ClassVar[bool] = False
    #: the call argument taking the conditioning ("prompt", "class_labels"; None: unconditional, `batch_size`)
    cond_kwarg: ClassVar[str | None] = None
    #: extra call arguments every generation needs (e.g. PixArt's resolution binning off)
    call_defaults: ClassVar[dict[str, Any]] = {}
    #: classifier-free guidance batch order: True for [unconditional; conditional]
    uncond_first: ClassVar[bool] = True
    #: trained by flow matching (x = (1 - σ) x0 + σ ε, velocity output): VP-only methods refuse it
    flow_matching: ClassVar[bool] = False
    #: what the denoiser outputs, for distillation: "eps" (an ε-model; reflow repurposes it into a velocity model),
    #: "rf" (the velocity z1 − z0 in rectified-flow time, diffaccel's RectifiedFlowPipeline) or "flow" (flow
    #: matching's noise − x0 on σ = 1 − s: the same field with the opposite sign)
    prediction: ClassVar[str] = "eps"
    #: keys of `condition`'s dict holding one row per image (CFG-batched tensors hold several blocks of rows)
    row_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__})"

    # ------------------------------------------------------------------ description
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def guidance(self, guidance_scale: float | None) -> float | None:
        """The guidance scale a call uses: the given one, else the family default (None for unguided families)."""
        if self.default_guidance is None:
            return None
        return self.default_guidance if guidance_scale is None else float(guidance_scale)

    def cfg_rows(self, guidance_scale: float | None) -> int:
        """Denoiser rows per image: 2 when classifier-free guidance doubles the batch, else 1."""
        g = self.guidance(guidance_scale)
        return 2 if g is not None and g > 1.0 else 1

    # ------------------------------------------------------------------ one generation through the pipeline
    def call_kwargs(self, cond: str | int | None, n: int, steps: int, guidance_scale: float | None = None,
                    **extra: Any) -> dict[str, Any]:
        """Keyword arguments of ``pipe(...)`` generating `n` images of one conditioning (prompt or class label)."""
        kw: dict[str, Any] = {"num_inference_steps": steps, **self.call_defaults}
        if self.cond_kwarg is None:
            kw["batch_size"] = n
        else:
            kw[self.cond_kwarg] = [int(cond) if self.conditioning_kind == "class" else str(cond)] * n
        if self.default_guidance is not None:
            kw["guidance_scale"] = self.guidance(guidance_scale)
        return {**kw, **extra}

    def guide(self, out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Combine a CFG-batched model output: ``uncond + w * (cond - uncond)`` (unchanged when w <= 1)."""
        if guidance_scale <= 1.0:
            return out
        first, second = out.chunk(2)
        uncond, cond = (first, second) if self.uncond_first else (second, first)
        return uncond + guidance_scale * (cond - uncond)

    # ------------------------------------------------------------------ the loops diffaccel owns
    def condition(self, conds: Sequence[Any], k: int, guidance_scale: float) -> dict[str, Any]:
        """Extra arguments of `eps` for `k` rows per conditioning (prompt-major), CFG-ready."""
        raise NotImplementedError

    def condition_rows(self, cond: dict[str, Any]) -> tuple[str, ...]:
        """The keys of `cond` (from `condition`) that hold per-image rows."""
        return tuple(k for k in self.row_keys if isinstance(cond.get(k), torch.Tensor))

    def reorder_condition(self, cond: dict[str, Any], rows: torch.Tensor) -> None:
        """Reorder the per-image rows of `cond` in place (FK resampling: conditioning follows its particle).

        Row ``i`` of the result is old row ``rows[i]``; a tensor batched for classifier-free guidance holds
        ``c`` blocks of ``len(rows)`` rows and each block is reordered alike."""
        n = len(rows)
        for key in self.condition_rows(cond):
            v = cond[key]
            if v.shape[0] % n:
                raise ValueError(f"{key} has {v.shape[0]} rows, not a multiple of the {n} images")
            idx = rows.to(v.device)
            cond[key] = v.reshape(v.shape[0] // n, n, *v.shape[1:])[:, idx].reshape(v.shape)

    def set_timesteps(self, scheduler: Any, steps: int) -> None:
        """Give `scheduler` the timesteps of a `steps`-step generation, as the pipeline's own call sets them."""
        scheduler.set_timesteps(steps)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (n, cfg.in_channels, h, w)

    def init_latents(self, n: int, generator: Any) -> torch.Tensor:
        """Initial noise as the pipeline draws it (already multiplied by the scheduler's `init_noise_sigma`)."""
        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor(self.noise_shape(n), generator=generator, device=self.device, dtype=self.denoiser.dtype)
        return x * self.pipe.scheduler.init_noise_sigma

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """One guided denoiser evaluation: the model output the pipeline would hand to its scheduler."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float images in [0, 1] (NCHW), what the pipeline returns with ``output_type="pt"``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ distillation (diffaccel.distill)
    # Couplings are stored as one image's unpacked latent (C, H, W), already VAE-scaled; the student is trained as a
    # rectified-flow velocity model ``m(z, τ, encoder_hidden_states=cond)`` with τ = 1000·(1 − s) (noise at s = 0).
    def latent_shape(self) -> tuple[int, ...]:
        """One image's latent at the pipeline's native size, as couplings store it."""
        return tuple(self.noise_shape(1)[1:])

    def text_rows(self, prompts: Sequence[str]) -> Any:
        """The student's conditioning of each prompt (batch-first tensors, or a dict of them)."""
        raise NotImplementedError(f"{type(self).__name__} has no text conditioning for distillation")

    def rf_velocity_model(self) -> torch.nn.Module:
        """The denoiser as a rectified-flow velocity model. For UNet families this is the denoiser itself: reflow
        trains its output to be the velocity (InstaFlow starts the 2-RF from the ε-model's weights)."""
        return self.denoiser

    def use_vae_resolution(self) -> None:
        """Make the VAE's own resolution the pipeline's default size where the pipeline's default is another one
        (default: nothing to do)."""

    def guided_kwargs(self, guidance_scale: float, n: int) -> dict[str, Any]:
        """Call arguments of `n` images at classifier-free guidance `guidance_scale` (Imagen form, 1 = off)."""
        return {"guidance_scale": float(guidance_scale)}

    def with_denoiser(self, denoiser: torch.nn.Module) -> Any:
        """A pipeline of the same class sharing every component but the denoiser (a trained student)."""
        components = {**self.pipe.components, self.denoiser_attr: denoiser}
        return type(self.pipe)(**components)

    def unguided_kwargs(self) -> dict[str, Any]:
        """Call arguments of a generation without classifier-free guidance (a distilled student's call)."""
        return {"guidance_scale": 1.0}

    def labels_text(self, labels: Sequence[int]) -> list[str]:
        """Readable names of class labels (for rewards that read text); the label itself when unnamed."""
        names = {int(v): k for k, v in (getattr(self.pipe, "labels", None) or {}).items()}
        return [names.get(int(c), str(int(c))) for c in labels]


def step_kwargs(scheduler: Any, eta: float, generator: Any) -> dict[str, Any]:
    """`eta` and `generator` for `scheduler.step` where it accepts them (as diffusers' prepare_extra_step_kwargs)."""
    params = inspect.signature(scheduler.step).parameters
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out
