"""Teachers: deterministic maps z0 → z1 (noise → clean latent) given prompts, used to make reflow couplings.

A teacher must be a deterministic function of (z0, prompt, config): the coupling (z0, z1) is what reflow trains on
(the "reflow" procedure of Liu et al. 2022, arXiv 2209.03003). Stochastic samplers are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..core.errors import InputError
from ..core.schedulers import class_name, is_stochastic
from ..core.weights import check_finite_parameters, check_pipeline_folder

SD_SOLVERS = ("ddim", "dpmsolver++")
#: the saved pipeline classes a teacher or student folder may hold
PIPELINE_KINDS = ("StableDiffusionPipeline", "RectifiedFlowPipeline", "FluxPipeline")


class TeacherError(InputError):
    """A teacher cannot be used: missing, of an unknown kind, or not deterministic."""


@runtime_checkable
class TeacherSampler(Protocol):
    deterministic: bool

    def __call__(self, z0: torch.Tensor, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        """z1 (latent times the VAE scaling factor) for noise `z0` and one prompt per row."""
        ...

    def describe(self) -> dict:
        """Everything that determines the map z0 → z1 (goes into the pair manifest and its hash)."""
        ...


def check_guidance(guidance_scale: float) -> float:
    """Imagen-form guidance scale: w = 1 is off, w > 1 is CFG; w ≤ 0 is an error."""
    w = float(guidance_scale)
    if not w > 0:
        raise TeacherError(f"teacher guidance scale must be > 0 (Imagen form: 1.0 = no guidance), got {w}")
    return w


class SDPipelineTeacher:
    """A Stable-Diffusion-style pipeline (the 1-RF: the original ε-model's probability-flow ODE) with a
    deterministic solver: DDIM with η = 0 (Song et al. 2021, Eq. 12) or DPM-Solver++(2M) (Lu et al. 2022)."""

    deterministic = True

    def __init__(self, pipe, *, solver: str = "ddim", steps: int = 25, name: str = "pipeline"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        if solver not in SD_SOLVERS:
            raise TeacherError(f"unknown teacher solver {solver!r}; deterministic solvers: {', '.join(SD_SOLVERS)}")
        if steps < 1:
            raise TeacherError(f"teacher steps must be >= 1, got {steps}")
        self.pipe, self.solver, self.steps, self.name = pipe, solver, int(steps), name
        if solver == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                     algorithm_type="dpmsolver++", solver_order=2)
        check_deterministic(pipe.scheduler)
        if float(pipe.scheduler.init_noise_sigma) != 1.0:
            raise TeacherError(f"{type(pipe.scheduler).__name__}.init_noise_sigma is "
                               f"{pipe.scheduler.init_noise_sigma}; the pair convention needs 1.0")
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, z0: torch.Tensor, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        w = check_guidance(guidance_scale)
        kw = {"eta": 0.0} if self.solver == "ddim" else {}
        with torch.no_grad():
            out = self.pipe(prompts, latents=z0.to(self.pipe.device, self.pipe.unet.dtype),
                            num_inference_steps=self.steps, guidance_scale=w, output_type="latent", **kw)
        return out.images.float().cpu()

    def describe(self) -> dict:
        return {"kind": "sd-pipeline", "teacher": self.name, "solver": self.solver, "steps": self.steps,
                "scheduler": type(self.pipe.scheduler).__name__, "weights": weights_fingerprint(self.pipe.unet)}


class RectifiedFlowEulerTeacher:
    """A k-RF (k ≥ 1, a `RectifiedFlowPipeline`) integrated with N Euler steps: makes the (k+1)-RF couplings and the
    one-step distillation targets (InstaFlow, arXiv 2309.06380, §3)."""

    deterministic = True

    def __init__(self, pipe, *, steps: int = 25, name: str = "pipeline"):
        if steps < 1:
            raise TeacherError(f"teacher steps must be >= 1, got {steps}")
        self.pipe, self.steps, self.name = pipe, int(steps), name
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, z0: torch.Tensor, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        w = check_guidance(guidance_scale)
        out = self.pipe(prompts, latents=z0, num_inference_steps=self.steps, guidance_scale=w, output_type="latent")
        return out.images.float().cpu()

    def describe(self) -> dict:
        return {"kind": "rf-euler", "teacher": self.name, "solver": "euler", "steps": self.steps,
                "weights": weights_fingerprint(self.pipe.unet)}


class FlowPipelineTeacher:
    """A flow-matching pipeline (Flux) run by its own sampler, FlowMatchEulerDiscreteScheduler: Euler steps of the
    flow ODE dx/dσ = v(x, σ) on the pipeline's own (shifted) σ grid — deterministic with `stochastic_sampling` off.
    Guidance w > 1 is true classifier-free guidance against the empty prompt (Imagen form). z0 and z1 are unpacked
    latents (C, H, W); the family packs them as the pipeline does, so z1 is exactly what
    ``pipe(prompt, latents=pack(z0), output_type="latent")`` returns, unpacked. The teacher of flow-native reflow
    (Liu et al. 2022, arXiv 2209.03003, §2.2: the flow is already a 1-rectified flow)."""

    deterministic = True

    def __init__(self, pipe, *, steps: int = 28, name: str = "pipeline"):
        from ..core.families import family_for

        if steps < 1:
            raise TeacherError(f"teacher steps must be >= 1, got {steps}")
        check_deterministic(pipe.scheduler)
        self.pipe, self.steps, self.name = pipe, int(steps), name
        self.family = family_for(pipe)
        pipe.set_progress_bar_config(disable=True)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape()

    def __call__(self, z0: torch.Tensor, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        w = check_guidance(guidance_scale)
        fam, denoiser = self.family, self.family.denoiser
        latents = fam.pack(z0.to(self.pipe.device, denoiser.dtype))
        with torch.no_grad():
            out = self.pipe(list(prompts), latents=latents, num_inference_steps=self.steps, output_type="latent",
                            **fam.unguided_kwargs(), **fam.guided_kwargs(w, len(prompts)))
        return fam.unpack(out.images).float().cpu()

    def describe(self) -> dict:
        fam = self.family
        return {"kind": "flow-pipeline", "family": fam.name, "teacher": self.name, "solver": "flow-euler",
                "steps": self.steps, "scheduler": type(self.pipe.scheduler).__name__,
                "scheduler_config": {k: v for k, v in dict(self.pipe.scheduler.config).items()
                                     if not k.startswith("_")},
                "latent_shape": list(self.latent_shape), "weights": weights_fingerprint(fam.denoiser)}


def check_deterministic(scheduler) -> None:
    """Refuse samplers that inject noise (the scheduler capability table): the map z0 → z1 must be a function."""
    name = class_name(scheduler)
    if is_stochastic(scheduler, eta=0.0):
        algo = (getattr(scheduler, "config", None) or {}).get("algorithm_type")
        if algo is not None and "sde" in str(algo):
            raise TeacherError(f"{name} with algorithm_type={algo!r} is stochastic")
        raise TeacherError(f"{name} is stochastic; reflow pairs need a deterministic solver ({', '.join(SD_SOLVERS)})")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short SHA-256 of a module's parameters (names, shapes and values): ties pairs to the exact weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pipeline_kind(path: str | Path) -> str:
    """The `_class_name` of a saved pipeline folder."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"teacher folder {path} has no model_index.json (not a saved diffusers pipeline)")
    return json.loads(index.read_text())["_class_name"]


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu"):
    """A zoo entry name (e.g. `digits-sd`, `random-sd`) or a saved pipeline folder → pipeline (fp32, eval)."""
    from ..core.families import family_for
    from ..zoo.registry import ENTRIES, ZooError
    from ..zoo.registry import load as zoo_load

    if name_or_path in ENTRIES:
        try:
            pipe = zoo_load(name_or_path, device=device)
        except ZooError as exc:  # missing or damaged zoo weights stay weights errors (exit code 3)
            raise ZooError(f"teacher {name_or_path!r}: {exc}") from exc
        family_for(pipe).use_vae_resolution()
        return pipe
    path = Path(name_or_path)
    if not path.exists():
        raise TeacherError(f"teacher {name_or_path!r} not found: neither a zoo entry ({', '.join(ENTRIES)}) "
                           "nor an existing pipeline folder")
    if not path.is_dir():
        raise TeacherError(f"teacher {name_or_path!r} is a file; give a saved pipeline folder or a zoo entry")
    fix = (f"re-save the teacher with `pipe.save_pretrained({str(path)!r})`, or rerun the `diffaccel distill` "
           "stage that wrote it")
    check_pipeline_folder(path, fix=fix)  # component by component, before any loading (exit code 3)
    kind = pipeline_kind(path)
    safe = dict(local_files_only=True, use_safetensors=True)
    if kind == "RectifiedFlowPipeline":
        from .pipeline import RectifiedFlowPipeline

        pipe = RectifiedFlowPipeline.from_pretrained(str(path), **safe)
    elif kind == "StableDiffusionPipeline":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **safe)
    elif kind == "FluxPipeline":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(path), **safe)
    else:
        raise TeacherError(f"teacher {path}: pipeline class {kind!r} is not supported "
                           f"({', '.join(PIPELINE_KINDS)})")
    check_finite_parameters(pipe, fix=fix, what=f"teacher {path}")
    family_for(pipe).use_vae_resolution()
    return pipe.to(device)


def make_teacher(name_or_path: str, *, solver: str = "ddim", steps: int = 25,
                 device: str | torch.device = "cpu") -> TeacherSampler:
    """Load a teacher and wrap it by what its family's denoiser predicts: ε-model pipelines get `solver`,
    rectified-flow pipelines Euler steps, flow-matching pipelines (Flux) their own flow-matching Euler sampler."""
    from ..core.families import family_for

    pipe = load_pipeline(name_or_path, device)
    prediction = family_for(pipe).prediction
    if prediction in ("rf", "flow"):
        if solver not in ("euler", "ddim"):  # ddim is the default flag value; a flow teacher always uses Euler
            raise TeacherError(f"a {'rectified-flow' if prediction == 'rf' else 'flow-matching'} teacher is "
                               f"integrated with Euler steps, not {solver!r}")
        if prediction == "flow":
            return FlowPipelineTeacher(pipe, steps=steps, name=str(name_or_path))
        return RectifiedFlowEulerTeacher(pipe, steps=steps, name=str(name_or_path))
    if solver == "euler":
        raise TeacherError(f"teacher {name_or_path!r} is an ε-model pipeline; use --teacher_solver ddim or dpmsolver++")
    return SDPipelineTeacher(pipe, solver=solver, steps=steps, name=str(name_or_path))
