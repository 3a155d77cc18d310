import pytest
import torch
from diffaccel.distill.objectives import (
    guidance_distill_loss,
    one_step_distill_loss,
    rf_interpolate,
    rf_loss,
    rf_time_to_unet_timestep,
    sample_time,
)
from diffaccel.distill.pipeline import RectifiedFlowEulerScheduler
from tolerances import eps


def _pair(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def test_interpolation_endpoints_and_time_mapping():
    z0, z1 = _pair()
    assert torch.equal(rf_interpolate(z0, z1, 0.0), z0)
    assert torch.equal(rf_interpolate(z0, z1, 1.0), z1)
    s = torch.tensor([0.0, 0.25, 1.0, 0.5])
    mid = rf_interpolate(z0, z1, s)
    torch.testing.assert_close(mid[1], 0.25 * z1[1] + 0.75 * z0[1])
    assert float(rf_time_to_unet_timestep(0.0)) == 1000.0 and float(rf_time_to_unet_timestep(1.0)) == 0.0
    taus = rf_time_to_unet_timestep(torch.linspace(0, 1, 11))
    assert bool((taus[1:] < taus[:-1]).all())
    t = sample_time(1000, generator=torch.Generator().manual_seed(0), eps=1e-3)
    assert float(t.min()) >= 1e-3 and float(t.max()) < 1.0
    with pytest.raises(ValueError, match="same shape"):
        rf_interpolate(z0, z1[:, :2], 0.5)


class Oracle(torch.nn.Module):
    """Returns a fixed velocity whatever the input: the exact one for straight couplings."""

    def __init__(self, v):
        super().__init__()
        self.v = v
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, t, encoder_hidden_states=None):
        return self.scale * self.v


def test_rf_loss_zero_for_exact_velocity_and_positive_otherwise():
    z0, z1 = _pair()
    gen = torch.Generator().manual_seed(1)
    exact = Oracle(z1 - z0)
    loss = rf_loss(exact, z0, z1, None, generator=gen)
    assert float(loss.detach()) == 0.0
    loss.backward()  # gradients reach the student's parameter only; the data carries none
    assert exact.scale.grad is not None and not z0.requires_grad and not z1.requires_grad
    assert float(rf_loss(Oracle(z1 + z0), z0, z1, None, generator=gen).detach()) > 1.0
    # one-step loss: ẑ1 = z0 + v(z0, τ=1000) equals z1 up to fp32 rounding of z0 + (z1 − z0)
    # each element is off by at most a rounding of |z| (fp32), so the mean squared error is below its square
    rounding = 2 * eps(torch.float32) * float(torch.maximum(z0.abs(), z1.abs()).max())
    assert float(one_step_distill_loss(exact, z0, z1, None).detach()) <= rounding**2
    assert float(one_step_distill_loss(exact, z0, z1, None, loss="huber").detach()) < 1e-6
    with pytest.raises(ValueError, match="decode"):
        one_step_distill_loss(exact, z0, z1, None, loss="features")


def test_features_loss_target_branch_has_no_graph():
    z0, z1 = _pair()
    student = Oracle(z1 - z0 + 0.1)
    lin = torch.nn.Linear(256, 8)
    calls = []

    def features(x):
        calls.append(x.requires_grad)
        return lin(x.flatten(1))

    loss = one_step_distill_loss(student, z0, z1, None, loss="features+l2", decode=lambda z: z, features=features)
    loss.backward()
    assert calls == [False, True]  # target under no_grad, prediction with graph
    assert student.scale.grad is not None and float(loss) > 0


def test_one_euler_step_lands_on_target_and_flow_match_sign():
    """Our scheduler lands on z1 for the oracle velocity; diffusers' flow-match scheduler needs the sign
    flip (its model output is noise − x0), and without it lands on the mirror point 2·z0 − z1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    z0, z1 = _pair(2)
    v = z1 - z0
    sched = RectifiedFlowEulerScheduler()
    sched.set_timesteps(1)
    assert float(sched.timesteps[0]) == 1000.0
    torch.testing.assert_close(sched.step(v, sched.timesteps[0], z0).prev_sample, z1)
    sched.set_timesteps(4)
    z = z0
    for t in sched.timesteps:
        z = sched.step(v, t, z).prev_sample
    torch.testing.assert_close(z, z1)

    fm = FlowMatchEulerDiscreteScheduler()
    fm.set_timesteps(1)
    torch.testing.assert_close(fm.step(-v, fm.timesteps[0], z0).prev_sample, z1)
    fm.set_timesteps(1)
    torch.testing.assert_close(fm.step(v, fm.timesteps[0], z0).prev_sample, 2 * z0 - z1)


def test_guidance_lora_starts_at_conditional_output_and_trains_only_adapters():
    """On the tiny random SD UNet: zero-init B gives the base conditional output; only LoRA parameters
    require grad; one UNet instance serves as teacher (adapters off) and student; a short fit approaches ε_w."""
    from diffaccel import zoo
    from diffaccel.distill.objectives import guided_output, predict
    from peft import LoraConfig

    pipe = zoo.load("random-sd")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([900, 500, 200, 50])
    cond = torch.randn(4, 77, 32, generator=g)
    uncond = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        base_c = predict(unet, x, t, cond)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(predict(unet, x, t, cond), base_c)
        target = guided_output(unet, x, t, cond, uncond, 3.0)
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    first = float(guidance_distill_loss(unet, x, t, cond, uncond, 3.0))
    for _ in range(15):
        loss = guidance_distill_loss(unet, x, t, cond, uncond, 3.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(guidance_distill_loss(unet, x, t, cond, uncond, 3.0)) < first
    with torch.no_grad():  # the teacher side (adapters disabled) is unchanged by training
        unet.disable_adapters()
        torch.testing.assert_close(guided_output(unet, x, t, cond, uncond, 3.0), target)
        unet.enable_adapters()
    with pytest.raises(TypeError, match="LoRA"):
        guidance_distill_loss(torch.nn.Identity(), x, t, cond, uncond, 3.0)
