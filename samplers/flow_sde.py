"""A stochastic flow-matching sampler with the probability-flow ODE's marginals: DDIM's eta family on the σ grid.

A flow-matching model (SD3, Flux) is trained on `x_σ = α_σ x0 + σ ε` with `α_σ = 1 - σ` and predicts the velocity
`v = ε - x0`, so one evaluation at `(x, σ)` gives `x̂0 = x - σ v` and `ε̂ = x + (1 - σ) v`. `FlowMatchSDEScheduler`
steps from `σ` to `σ' < σ` with the generalised DDIM update (Song et al., "Denoising Diffusion Implicit Models",
ICLR 2021, Eq. 12, written for the path `(α_σ, σ)` instead of the VP path):

    x' = α' x̂0 + sqrt(σ'² - s²) ε̂ + s z,      z ~ N(0, I)
    s  = min(η · s_DDPM, σ'),   s_DDPM² = σ'² (1 - SNR(σ) / SNR(σ')),   SNR(σ) = α_σ² / σ²

* η = 0 is `x + (σ' - σ) v`, FlowMatch-Euler's step (computed by the same expression, so it matches
  `FlowMatchEulerDiscreteScheduler` bit for bit).
* η = 1 is ancestral sampling: `s_DDPM²` is the variance of the forward posterior `q(x_σ' | x_σ, x0)` of the Markov
  process with these marginals (Kingma et al., "Variational Diffusion Models", 2021, for any `(α, σ)` path): DDIM's
  `σ_t(η = 1)` (Song et al., Eq. 16) restated on this path.
* Why the marginals match: for every η, `q(x_σ' | x_σ, x0) = N(α' x0 + sqrt(σ'² - s²) (x_σ - α x0) / σ, s²)` leaves
  `q(x_σ' | x0) = N(α' x0, σ'²)` unchanged (DDIM, Lemma 1), so the sampler is a discretisation of one member of
  the family of reverse SDEs that share the probability-flow ODE's marginals (Song et al., "Score-Based Generative
  Modeling through Stochastic Differential Equations", ICLR 2021, Eq. 6 and App. D.1):

      dx = [v - (g²/2) ∇log p_σ(x)] dσ + g dW̄,   ∇log p_σ(x) = -ε̂ / σ = -(x - α x̂0) / σ²,

  with `g² = η² · 2σ / (1 - σ)` (expand `s_DDPM²` for `σ - σ' = h → 0`: `s_DDPM² = 2σh / (1 - σ) + O(h²)`). Replacing
  `x0` by its posterior mean `x̂0` keeps each step's mean exact and leaves an `O(h²)` error in its variance
  (`(α' - sqrt(σ'² - s²) α / σ)² Var[x0 | x_σ]`, a squared O(h) coefficient), which vanishes summed over 1/h steps.
  This is the SDE of Flow-GRPO's ODE-to-SDE conversion (Liu et al., "Flow-GRPO: Training Flow Matching Models via
  Online RL", 2025, arXiv 2505.05470; noise `σ_t = a sqrt(t / (1 - t))`): their `a` is `η √2` here. They step it
  with Euler–Maruyama; we take the exact Gaussian transition between grid levels (as "Coefficients-Preserving
  Sampling for Reinforcement Learning with Flow Matching", arXiv 2509.05952, also does from DDIM), which needs no
  special case at σ = 1 (there `s = η σ'`).

diffusers' own `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` steps `x' = α' x̂0 + σ' z`: that is `s = σ'`,
the end of the family where `x_σ` is forgotten. Its variance error `α'² Var[x0 | x_σ]` is O(1) per step, so it does
not converge to the ODE's marginals (on a two-mode toy each mode collapses towards its mean; the tests measure it).

The stock Flux and SD3 pipelines pass neither `eta` nor `generator` to `step`: the config's `eta` is used and the
noise comes from `noise_generator` (set it to the generator given to the pipeline to make a stock call
reproducible: initial latents and step noise are then drawn from one stream, as diffaccel's own loops draw them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core.errors import InputError


@dataclass
class FlowMatchSDESchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def noise_std(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """`(s, sqrt(σ'² - s²))` of one step (module docstring), in float64."""
    if sigma_next <= 0.0:
        return 0.0, 0.0
    ratio = (1.0 - sigma) * sigma_next / ((1.0 - sigma_next) * sigma)  # sqrt(SNR(σ) / SNR(σ'))
    s_ddpm = sigma_next * max(0.0, 1.0 - ratio * ratio) ** 0.5
    s = min(eta * s_ddpm, sigma_next)
    return s, max(0.0, sigma_next * sigma_next - s * s) ** 0.5


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatch-Euler's sigma grid (every option of `FlowMatchEulerDiscreteScheduler`) stepped with DDIM's eta
    family (module docstring). ``eta`` (config, or per `step`): 0 is FlowMatch-Euler, 1 ancestral sampling."""

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        eta: float = 1.0,
    ) -> None:
        check_eta(eta)
        if stochastic_sampling:
            raise InputError("FlowMatchSDEScheduler steps with `eta`; stochastic_sampling=True is diffusers' "
                             "FlowMatchEulerDiscreteScheduler option (full re-noising, not the ODE's marginals)")
        if invert_sigmas:
            raise InputError("FlowMatchSDEScheduler needs decreasing sigmas (invert_sigmas=False)")
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift,
                         use_dynamic_shifting=use_dynamic_shifting, base_shift=base_shift, max_shift=max_shift,
                         base_image_seq_len=base_image_seq_len, max_image_seq_len=max_image_seq_len,
                         shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                         use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                         time_shift_type=time_shift_type)
        #: where step noise comes from when `step` gets no generator (stock pipelines pass none)
        self.noise_generator: torch.Generator | list[torch.Generator] | None = None

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """One step from `timestep`'s σ to the next grid level; `eta` None uses the config's. Noise: `variance_noise`,
        else drawn from `generator`, else from `noise_generator` (else torch's global stream)."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise InputError("pass one of `scheduler.timesteps` (a float sigma-time), not an integer index")
        eta = self.config.eta if eta is None else eta
        check_eta(eta)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # as FlowMatchEulerDiscreteScheduler: step in float32
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = sample - sigma * model_output
        if eta == 0.0:
            prev = sample + (sigma_next - sigma) * model_output  # FlowMatch-Euler's expression, bit for bit
        else:
            s, c_eps = noise_std(float(sigma), float(sigma_next), float(eta))
            eps = sample + (1.0 - sigma) * model_output
            prev = (1.0 - sigma_next) * x0 + c_eps * eps
            if s > 0.0:
                if variance_noise is None:
                    variance_noise = randn_tensor(sample.shape, generator=generator or self.noise_generator,
                                                  device=sample.device, dtype=sample.dtype)
                prev = prev + s * variance_noise.to(sample)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return FlowMatchSDESchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(model_output.dtype))


def check_eta(eta: Any) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0 or eta == float("inf"):
        raise InputError(f"eta must be a finite number >= 0 (0: FlowMatch-Euler, 1: ancestral), got {eta!r}")


def stochastic_counterpart(scheduler: Any) -> Any:
    """The scheduler FK steering runs on a flow pipeline: FlowMatch-Euler — a deterministic
    `FlowMatchEulerDiscreteScheduler`, or the PNDM family's ``ddim`` in flow mode, which is the same method — becomes
    `FlowMatchSDEScheduler` on the same sigma grid (its eta family, as DDIM's eta makes DDIM stochastic); any other
    scheduler is returned unchanged (and judged by `steering.check_sampler`)."""
    if type(scheduler) is FlowMatchEulerDiscreteScheduler and not scheduler.config.get("stochastic_sampling", False):
        return FlowMatchSDEScheduler.from_config(scheduler.config)
    if type(scheduler).__name__ == "PseudoNumericalScheduler" and scheduler.is_flow and scheduler.method == "ddim":
        from .flow import SIGMA_OPTIONS

        return FlowMatchSDEScheduler(**{k: v for k, v in scheduler.config.items() if k in SIGMA_OPTIONS})
    return scheduler
