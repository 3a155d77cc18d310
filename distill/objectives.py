"""Training objectives of the distillation stages, in rectified-flow (RF) time.

Convention (one place): RF time `s` runs from `s = 0` (Gaussian noise `z0`) to `s = 1` (clean latent `z1`,
already multiplied by the VAE scaling factor); `z_s = s·z1 + (1 − s)·z0` and the target velocity is `z1 − z0`
(Liu et al. 2022, "Flow Straight and Fast", arXiv 2209.03003, Eq. 1). The UNet sees `τ(s) = 1000·(1 − s)`, so noise
sits at τ = 1000 as in Stable Diffusion (the InstaFlow/2-RF checkpoints' convention, Liu et al. 2023, arXiv
2309.06380). A model is called as ``model(z, τ, encoder_hidden_states=cond)`` and returns a velocity (a tensor or
an object with ``.sample``, like a diffusers UNet).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.errors import InputError

UNET_TIME_SCALE = 1000.0
TIME_SAMPLERS = ("uniform", "logit-normal")
ONE_STEP_LOSSES = ("l2", "features", "features+l2", "huber")


def rf_time_to_unet_timestep(s: torch.Tensor | float) -> torch.Tensor:
    """τ(s) = 1000·(1 − s): RF time 0 (noise) → UNet timestep 1000, RF time 1 (data) → 0."""
    s = torch.as_tensor(s, dtype=torch.float32)
    return UNET_TIME_SCALE * (1.0 - s)


def rf_interpolate(z0: torch.Tensor, z1: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """z_s = s·z1 + (1 − s)·z0 with `s` a scalar or one value per batch row (Liu et al. 2022, Eq. 1)."""
    if z0.shape != z1.shape:
        raise InputError(f"z0 and z1 must have the same shape, got z0 {tuple(z0.shape)} and z1 {tuple(z1.shape)}")
    s = torch.as_tensor(s, dtype=z0.dtype, device=z0.device)
    if s.ndim == 1:
        if s.shape[0] != z0.shape[0]:
            raise InputError(f"s has {s.shape[0]} values but the batch has {z0.shape[0]} rows")
        s = s.view(-1, *([1] * (z0.ndim - 1)))
    return s * z1 + (1.0 - s) * z0


def sample_time(n: int, *, time_sampler: str = "uniform", eps: float = 1e-3,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` RF times in [eps, 1): uniform (the reference), or logit-normal (an ablation, Esser et al. 2024)."""
    if time_sampler not in TIME_SAMPLERS:
        raise InputError(f"time_sampler must be one of {TIME_SAMPLERS}, got {time_sampler!r}")
    if not 0.0 <= eps < 1.0:
        raise InputError(f"eps must be in [0, 1), got {eps}")
    if time_sampler == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        u = torch.sigmoid(torch.randn(n, generator=generator))
    return eps + (1.0 - eps) * u


def predict(model: Callable, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """Call a diffusers-style denoiser and return its output tensor."""
    t = torch.as_tensor(t, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    out = model(z, t, encoder_hidden_states=cond, **kwargs)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def velocity(model: Callable, z: torch.Tensor, s: torch.Tensor | float, cond: torch.Tensor | None) -> torch.Tensor:
    """v(z_s, s | c): the model evaluated at RF time `s` through `rf_time_to_unet_timestep`."""
    s = torch.as_tensor(s, dtype=torch.float32)
    return predict(model, z, rf_time_to_unet_timestep(s).to(z.device), cond)


def rf_loss(model: Callable, z0: torch.Tensor, z1: torch.Tensor, cond: torch.Tensor | None, *,
            time_sampler: str = "uniform", eps: float = 1e-3, generator: torch.Generator | None = None,
            s: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow regression E_s ‖v_θ(z_s, τ(s), c) − (z1 − z0)‖² (Liu et al. 2022, Eq. 1).

    Mean over latent elements and batch. `s` (one value per row) overrides the sampler, e.g. for the k-step
    variant."""
    if s is None:
        s = sample_time(z0.shape[0], time_sampler=time_sampler, eps=eps, generator=generator)
    s = s.to(z0.device, torch.float32)
    z_s = rf_interpolate(z0, z1, s.to(z0.dtype))
    v = velocity(model, z_s, s, cond)
    return F.mse_loss(v.float(), (z1 - z0).float())


def one_step_prediction(student: Callable, z0: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """ẑ1 = z0 + v_φ(z0, τ = 1000 | c): one Euler step over the whole RF time interval (InstaFlow)."""
    return z0 + velocity(student, z0, 0.0, cond)


def one_step_distill_loss(student: Callable, z0: torch.Tensor, z1_target: torch.Tensor, cond: torch.Tensor | None,
                          *, loss: str = "l2", decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          huber_c: float = 1e-3) -> torch.Tensor:
    """Distillation loss of the one-step student against a multi-step target (InstaFlow, arXiv 2309.06380, §3).

    `l2`: ‖ẑ1 − z1ᵀ‖² in latent space (stage A); `huber`: √(‖·‖² + c²) − c per element; `features`: the squared
    distance of feature vectors of the decoded images — our offline stand-in for LPIPS (stage B), with `decode`
    latent → image and `features` image → (N, d) (the zoo's digits-features network); `features+l2`: their sum.
    The target branch carries no graph."""
    if loss not in ONE_STEP_LOSSES:
        raise InputError(f"loss must be one of {ONE_STEP_LOSSES}, got {loss!r}")
    z1_target = z1_target.detach()
    pred = one_step_prediction(student, z0, cond)
    total = pred.new_zeros((), dtype=torch.float32)
    if loss in ("l2", "features+l2"):
        total = total + F.mse_loss(pred.float(), z1_target.float())
    if loss == "huber":
        d2 = (pred.float() - z1_target.float()) ** 2
        total = total + (torch.sqrt(d2 + huber_c**2) - huber_c).mean()
    if loss in ("features", "features+l2"):
        if decode is None or features is None:
            raise InputError(f"loss {loss!r} needs both `decode` (latent -> image) and `features` (image -> vector)")
        with torch.no_grad():
            f_target = features(decode(z1_target)).float()
        f_pred = features(decode(pred)).float()
        total = total + F.mse_loss(f_pred, f_target) * f_pred.shape[1]
    return total


def guided_output(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance o_w = o(∅) + w·(o(c) − o(∅)) in the Imagen form (w = 1: no guidance; Ho & Salimans
    2022, in the Imagen parameterisation), batching both branches into one call as diffusers does."""
    out = predict(model, torch.cat([x, x]), torch.as_tensor(t, device=x.device).expand(x.shape[0]).repeat(2),
                  torch.cat([uncond, cond]))
    o_u, o_c = out.chunk(2)
    w = torch.as_tensor(w, dtype=o_c.dtype, device=o_c.device)
    if w.ndim == 1:
        w = w.view(-1, *([1] * (o_c.ndim - 1)))
    return o_u + w * (o_c - o_u)


def guidance_distill_loss(unet_with_lora, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor, w: float | torch.Tensor, *, student: Callable | None = None
                          ) -> torch.Tensor:
    """‖o_φ(x_t, t, c) − o_w(x_t, t, c)‖²: one pass of the LoRA student against two guided passes of the same UNet
    with its adapters disabled (guidance distillation, Meng et al. 2023, CVPR; LoRA sharing the base weights as in
    "LoRA-Enhanced Distillation on Guided Diffusion Models", arXiv 2312.06899). `o` is ε or a velocity; the
    target carries no graph. `student` is what runs the student pass (default the same module; under DDP the
    wrapped model, so that gradients are synchronised)."""
    if not hasattr(unet_with_lora, "disable_adapters"):
        raise TypeError(f"{type(unet_with_lora).__name__} has no LoRA adapters (expected a peft-enabled diffusers "
                        "model with disable_adapters/enable_adapters)")
    unet_with_lora.disable_adapters()
    try:
        with torch.no_grad():
            target = guided_output(unet_with_lora, x_t, t, cond, uncond, w)
    finally:
        unet_with_lora.enable_adapters()
    pred = predict(student if student is not None else unet_with_lora, x_t, t, cond)
    return F.mse_loss(pred.float(), target.float())
