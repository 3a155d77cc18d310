"""Worker functions run on spawned gloo ranks by tests/parallel (importable as `workers`: conftest puts this folder
on sys.path, and spawned ranks inherit it).

Each `scenario_*` builds its own tiny model with a fixed seed (identical on every rank), compares the parallel
result with the single-device model on the same rank and returns plain numbers. `suite(rank, world, names)` runs
several scenarios in one process group so the test suite pays the process start-up once per file.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from diffaccel.parallel.attention import pcpp_rows
from diffaccel.parallel.config import PatchParallelConfig
from diffaccel.parallel.parallelize import find_denoiser, parallelize
from torch import nn

SCENARIOS: dict[str, Any] = {}


def scenario(fn):
    SCENARIOS[fn.__name__.removeprefix("scenario_")] = fn
    return fn


def suite(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        out[name] = SCENARIOS[name](rank, world)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_unet(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The layer tests' fixture: 2 levels (32, 64), cross-attention, random GroupNorm affine parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return unet.to(dtype).eval()


def tiny_dit(dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                 num_embeds_ada_norm=1000).to(dtype).eval()


def tiny_pixart(dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False)
    with torch.no_grad():  # PixArt zero-initialises its scale-shift table; randomise so every path matters
        for name, p in m.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, 0.5)
    return m.to(dtype).eval()


def unet_inputs(batch: int = 2, hw: int = 16, dtype=torch.float32, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, hw, hw, generator=g, dtype=dtype),
            "timestep": torch.tensor(500), "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g,
                                                                                  dtype=dtype)}


def dit_inputs(batch: int = 2, hw: int = 16, dtype=torch.float32, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, hw, hw, generator=g, dtype=dtype),
            "timestep": torch.tensor([500] * batch), "class_labels": torch.arange(batch) % 10}


def pixart_inputs(batch: int = 2, hw: int = 16, dtype=torch.float32, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, hw, hw, generator=g, dtype=dtype),
            "timestep": torch.tensor([500] * batch), "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g,
                                                                                          dtype=dtype),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


MODELS = {"unet": (tiny_unet, unet_inputs, "sample"), "dit": (tiny_dit, dit_inputs, "hidden_states"),
          "pixart": (tiny_pixart, pixart_inputs, "hidden_states")}


def call(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def with_sample(inputs: dict[str, Any], key: str, x: torch.Tensor) -> dict[str, Any]:
    return {**inputs, key: x}


# ---------------------------------------------------------------------------------------------- exactness
@scenario
def scenario_sync_per_call(rank: int, world: int) -> dict[str, float]:
    """Sync mode vs single device, one call, fp32 and fp64, for each model family; plus a repeated call."""
    out = {}
    for fam, (build, make_inputs, _) in MODELS.items():
        for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            model = build(dtype)
            inputs = make_inputs(dtype=dtype)
            ref = call(model, inputs)
            h = parallelize(model, PatchParallelConfig(mode="sync", timeout_s=60))
            h.reset()
            got = call(model, inputs)
            out[f"{fam}_{tag}"] = rel_err(got, ref)
            got2 = call(model, inputs)
            out[f"{fam}_{tag}_repeat"] = float((got2 - got).abs().max())
            h.remove()
            out[f"{fam}_{tag}_removed"] = float((call(model, inputs) - ref).abs().max())
    return out


@scenario
def scenario_pipeline_loop_fp64(rank: int, world: int) -> dict[str, Any]:
    """10-step CFG sampling through the stock pipelines in fp64: sync (with and without cfg_parallel) equals the
    single-device loop; repeated calls and all ranks give identical results; displaced runs end-to-end."""
    import hashlib

    from diffaccel import zoo

    out: dict[str, Any] = {}
    runs = {
        "sd": ("random-sd", dict(prompt=["a handwritten digit 3"], height=32, width=32, guidance_scale=5.0,
                                 output_type="latent")),
        "dit": ("random-dit", dict(class_labels=[1], guidance_scale=4.0, output_type="pt")),
    }
    for fam, (name, kw) in runs.items():
        pipe = zoo.load(name).to(torch.float64)
        pipe.set_progress_bar_config(disable=True)
        find_denoiser(pipe).eval()  # zoo random models are built in train mode: DiT's class dropout would be random

        def run(pipe=pipe, kw=kw):
            return pipe(**kw, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images

        ref = run()
        configs = [("sync", PatchParallelConfig(mode="sync", timeout_s=60)),
                   ("displaced", PatchParallelConfig(mode="displaced", warmup_steps=2, timeout_s=60))]
        if world % 2 == 0:
            configs.append(("sync_cfg", PatchParallelConfig(mode="sync", cfg_parallel=True, timeout_s=60)))
        for tag, cfg in configs:
            h = parallelize(pipe, cfg)
            got = run()
            if tag == "displaced":  # state is reset between pipeline calls
                out[f"{fam}_{tag}_repeat"] = float((run() - got).abs().max())
            h.remove()
            out[f"{fam}_{tag}_err"] = rel_err(got, ref)
            out[f"{fam}_{tag}_sha"] = hashlib.sha256(got.contiguous().numpy().tobytes()).hexdigest()
            out[f"{fam}_{tag}_calls"] = h.state.call_index + 1
    return out


# ---------------------------------------------------------------------------------------------- displaced / PCPP
class MaskedReference:
    """Single-device reference for PCPP: full attention masked to own band + m border rows of each neighbour."""

    def __init__(self, full_hw: tuple[int, int], n: int, fraction: float | None) -> None:
        self.full_hw, self.n, self.fraction = full_hw, n, fraction

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        B, L, _ = hidden_states.shape
        H, W = self.full_hw
        d = round(math.sqrt(H * W / L))
        rows, width = H // d, W // d
        h = rows // self.n
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))
        row = torch.arange(L) // width
        band = row // h
        if self.fraction is None:
            mask = torch.ones(L, L, dtype=torch.bool)
        else:
            m = pcpp_rows(self.fraction, h)
            qb, kr, kb = band[:, None], row[None, :], band[None, :]
            mask = (kb == qb) | ((kb == qb - 1) & (kr >= qb * h - m)) | ((kb == qb + 1) & (kr < (qb + 1) * h + m))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        o = o.transpose(1, 2).reshape(B, -1, attn.heads * hd).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](o))


def masked_reference(model: nn.Module, inputs: dict[str, Any], key: str, n: int,
                     fraction: float | None) -> torch.Tensor:
    attns = [m for m in model.modules() if type(m).__name__ == "Attention" and not m.is_cross_attention]
    saved = [a.processor for a in attns]
    x = inputs[key]
    for a in attns:
        a.set_processor(MaskedReference((x.shape[2], x.shape[3]), n, fraction))
    try:
        return call(model, inputs)
    finally:
        for a, p in zip(attns, saved, strict=True):
            a.set_processor(p)


@scenario
def scenario_displaced(rank: int, world: int) -> dict[str, Any]:
    """Fixed point (same input every call) for displaced (all GN modes) and PCPP (vs a masked single-device
    reference); warm-up >= calls equals sync; PCPP f=1 vs displaced on changing inputs."""
    out: dict[str, Any] = {}
    for fam, (build, make_inputs, key) in MODELS.items():
        model = build()
        inputs = make_inputs()
        ref = call(model, inputs)
        gn_modes = ("corrected", "substitute", "stale") if fam == "unet" and world == 2 else ("corrected",)
        for gn in gn_modes:
            h = parallelize(model, PatchParallelConfig(mode="displaced", warmup_steps=1, gn_mode=gn, timeout_s=60))
            h.reset()
            errs = [rel_err(call(model, inputs), ref) for _ in range(4)]
            h.remove()
            out[f"{fam}_fixed_point_{gn}"] = max(errs[2:])
        # the UNet needs ~30 calls to reach the PCPP fixed point: only on two ranks
        for f in (((0.5,) if world == 2 else ()) if fam == "unet" else (0.0, 0.25, 0.5, 1.0)):
            mref = masked_reference(model, inputs, key, world, f)
            h = parallelize(model, PatchParallelConfig(mode="pcpp", warmup_steps=1, pcpp_fraction=f, timeout_s=60))
            h.reset()
            # with f < 1 the model itself changes, and stale halos / K/V from the synchronous warm-up call
            # propagate one communicating layer per call: iterate until the output stops changing
            call(model, inputs)  # call 0 (sync); the loop starts at call 1, the last warm-up call
            prev, got, calls = None, call(model, inputs), 2
            while calls < 80 and (prev is None or not torch.equal(prev, got)):
                prev, got, calls = got, call(model, inputs), calls + 1
            h.remove()
            out[f"{fam}_pcpp{f}_calls"] = calls
            out[f"{fam}_pcpp{f}_vs_masked"] = rel_err(got, mref)
            out[f"{fam}_pcpp{f}_vs_full"] = rel_err(got, ref)
        # warm-up covering every call reproduces sync
        g = torch.Generator().manual_seed(5)
        xs = [inputs[key] + 0.1 * i * torch.randn(inputs[key].shape, generator=g) for i in range(3)]
        refs = [call(model, with_sample(inputs, key, x)) for x in xs]
        h = parallelize(model, PatchParallelConfig(mode="displaced", warmup_steps=10, timeout_s=60))
        h.reset()
        out[f"{fam}_warmup_covers_all"] = max(rel_err(call(model, with_sample(inputs, key, x)), r)
                                              for x, r in zip(xs, refs, strict=True))
        h.remove()
        if world == 2:  # PCPP with f >= 1 on two ranks is DistriFusion, also away from the fixed point
            seqs = {}
            for mode in ("displaced", "pcpp"):
                h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=0, pcpp_fraction=1.0,
                                                           timeout_s=60))
                h.reset()
                seqs[mode] = [call(model, with_sample(inputs, key, x)) for x in xs]
                h.remove()
            out[f"{fam}_pcpp1_vs_displaced"] = max(float((a - b).abs().max())
                                                   for a, b in zip(seqs["pcpp"], seqs["displaced"], strict=True))
            out[f"{fam}_displaced_vs_fresh"] = rel_err(seqs["displaced"][-1], refs[-1])
    return out


@scenario
def scenario_first_order(rank: int, world: int) -> dict[str, Any]:
    """fp64: sync call on x, displaced call on x + delta*d; the error vs the fresh output must be O(delta)."""
    out: dict[str, Any] = {}
    deltas = (1e-2, 1e-3, 1e-4)
    for fam, (build, make_inputs, key) in MODELS.items():
        model = build(torch.float64)
        inputs = make_inputs(dtype=torch.float64)
        x = inputs[key]
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        refs = [call(model, with_sample(inputs, key, x + delta * d)) for delta in deltas]
        for mode in ("displaced", "pcpp"):
            h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=0, pcpp_fraction=1.0, timeout_s=60))
            errs = []
            for delta, ref in zip(deltas, refs, strict=True):
                h.reset()
                call(model, inputs)
                errs.append(float((call(model, with_sample(inputs, key, x + delta * d)) - ref).abs().max()))
            h.remove()
            out[f"{fam}_{mode}"] = errs
    return out


# ---------------------------------------------------------------------------------------------- byte meter
def layer_shapes(model: nn.Module, inputs: dict[str, Any]) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(kind, module, input shape) of every communicating layer, from a single-device run."""
    found = []

    def pre(mod, args, kind):
        found.append((kind, mod, tuple(args[0].shape)))

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1 and name not in ("conv_in", "pos_embed.proj"):
            handles.append(m.register_forward_pre_hook(lambda mod, a: pre(mod, a, "conv_halo")))
        elif isinstance(m, nn.GroupNorm):
            handles.append(m.register_forward_pre_hook(lambda mod, a: pre(mod, a, "gn_stats")))
        elif type(m).__name__ == "Attention" and not m.is_cross_attention:
            handles.append(m.to_k.register_forward_pre_hook(lambda mod, a: pre(mod, a, "attn_kv")))
    try:
        out = call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    found.append(("output", None, tuple(out.shape)))
    return found


def expected_bytes(shapes, full_hw: tuple[int, int], n: int, r: int, mode: str, phase: str, f: float,
                   elt: int) -> dict[str, int]:
    """Closed-form bytes, per layer, for rank r (interior ranks send both ways, edge ranks one way).
    Halo rows: 1 above and 1 below for 3x3 stride-1 convs, 1 above and none below for stride 2."""
    H, W = full_hw
    exp = dict.fromkeys(("attn_kv", "conv_halo", "gn_stats", "output"), 0)
    neighbours = (r > 0) + (r < n - 1)
    for kind, mod, shape in shapes:
        if kind == "conv_halo" and not (mode == "naive" and phase == "displaced"):
            B, C, Hl, Wl = shape
            up_rows = 1 if mod.stride[0] == 1 else 0  # my first rows, needed below by rank r-1
            down_rows = 1  # my last row, needed above by rank r+1
            exp[kind] += ((r > 0) * up_rows + (r < n - 1) * down_rows) * Wl * C * B * elt
        elif kind == "gn_stats" and not (mode == "naive" and phase == "displaced"):
            B = shape[0]
            exp[kind] += (n - 1) * 2 * B * mod.num_groups * 4
        elif kind == "attn_kv":
            B, L, _ = shape
            C = mod.out_features
            if phase == "sync" or mode == "displaced":
                exp[kind] += (n - 1) * 2 * C * (L // n) * B * elt
            elif mode == "pcpp":
                d = round(math.sqrt(H * W / L))
                h, w = H // d // n, W // d
                exp[kind] += neighbours * pcpp_rows(f, h) * w * 2 * C * B * elt
        elif kind == "output":
            B, C_out, Ho, Wo = shape
            exp[kind] += (n - 1) * B * C_out * (Ho // n) * Wo * elt
    return exp


@scenario
def scenario_bytes(rank: int, world: int) -> dict[str, Any]:
    """Recorded bytes per call and kind vs the closed forms, for every mode, UNet and DiT (fp32)."""
    out: dict[str, Any] = {}
    f = 0.3
    for fam in ("unet", "dit"):
        build, make_inputs, key = MODELS[fam]
        model = build()
        inputs = make_inputs()
        shapes = layer_shapes(model, inputs)
        hw = tuple(inputs[key].shape[2:])
        for mode in ("sync", "displaced", "pcpp", "naive"):
            h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=0, pcpp_fraction=f, timeout_s=60))
            h.reset()
            call(model, inputs)
            call(model, inputs)
            per_call = h.meter.per_call()
            h.remove()
            for i, phase in ((0, "sync"), (1, "sync" if mode == "sync" else "displaced")):
                got = {k: v for k, v in per_call[i].items() if k != "other"}
                out[f"{fam}_{mode}_call{i}"] = (got, expected_bytes(shapes, hw, world, rank, mode, phase, f, 4))
    return out


# ---------------------------------------------------------------------------------------------- bad input
def _error_of(fn) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@scenario
def scenario_errors(rank: int, world: int) -> dict[str, Any]:
    """Every bad input must raise a clear error on every rank (each rank reports its own message)."""
    from diffaccel import zoo
    from diffusers import UNet2DModel

    out: dict[str, Any] = {}
    model = tiny_unet()
    h = parallelize(model, PatchParallelConfig(mode="sync", timeout_s=30))
    h.reset()
    out["height_not_divisible"] = _error_of(lambda: call(model, unet_inputs(hw=4 * world + 2)))
    h.reset()
    out["too_many_ranks"] = _error_of(lambda: call(model, unet_inputs(hw=2 * world - 2)))
    h.reset()
    x = unet_inputs(seed=1 + rank)  # different seeds per rank
    out["different_inputs"] = _error_of(lambda: call(model, x))
    h.remove()
    torch.manual_seed(0)
    unet2d = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    out["unsupported_model"] = _error_of(lambda: parallelize(unet2d))
    cfg = PatchParallelConfig(mode="displaced", warmup_steps=3 + rank, timeout_s=30)  # differs between ranks
    out["mismatched_config"] = _error_of(lambda: parallelize(tiny_unet(), cfg))
    out["unknown_mode"] = _error_of(lambda: PatchParallelConfig(mode="fast"))
    pipe = zoo.load("random-sd")
    pipe.set_progress_bar_config(disable=True)
    h = parallelize(pipe, PatchParallelConfig(mode="sync", cfg_parallel=True, timeout_s=30))
    out["cfg_without_guidance"] = _error_of(lambda: pipe("a digit", height=32, width=32, num_inference_steps=1,
                                                         guidance_scale=1.0, output_type="latent"))
    h.remove()
    h = parallelize(tiny_unet(), PatchParallelConfig(mode="sync", timeout_s=30))  # still usable afterwards
    h.remove()
    out["still_works"] = True
    return out


@scenario
def scenario_dead_rank(rank: int, world: int) -> dict[str, Any]:
    """The last rank dies (os._exit) in the middle of a displaced run; survivors must raise naming it."""
    model = tiny_unet()
    inputs = unet_inputs(batch=1)
    h = parallelize(model, PatchParallelConfig(mode="displaced", warmup_steps=1, timeout_s=20))
    h.reset()
    call(model, inputs)
    call(model, inputs)
    if rank == world - 1:
        os._exit(3)
    t0 = time.monotonic()
    err = _error_of(lambda: [call(model, inputs) for _ in range(3)])
    return {"error": err, "seconds": time.monotonic() - t0}


@scenario
def scenario_hung_rank(rank: int, world: int) -> dict[str, Any]:
    """The last rank stops answering (sleeps); the others must time out within timeout_s naming it."""
    return _hang_last_rank(rank, world, tiny_unet(), unet_inputs(batch=1))


@scenario
def scenario_hung_rank_flux(rank: int, world: int) -> dict[str, Any]:
    """As `hung_rank`, in displaced mode on random-flux's joint attention (its image K/V exchange)."""
    pipe = zoo_pipe("flux")
    return _hang_last_rank(rank, world, find_denoiser(pipe), captured_call("flux", pipe), mode="displaced")


def _hang_last_rank(rank: int, world: int, model: nn.Module, inputs: dict[str, Any],
                    mode: str = "sync") -> dict[str, Any]:
    h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=0, timeout_s=4))
    h.reset()
    call(model, inputs)
    if rank == world - 1:
        time.sleep(120)
    t0 = time.monotonic()
    err = _error_of(lambda: call(model, inputs))
    return {"error": err, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------------- single layers
@scenario
def scenario_layers(rank: int, world: int) -> dict[str, Any]:
    """Each rule on a lone layer vs the unwrapped layer on the full tensor (sync calls)."""
    from diffaccel.parallel.attention import PatchAttnProcessor
    from diffaccel.parallel.comm import ByteMeter, Communicator
    from diffaccel.parallel.group_norm import GlobalGroupNormHook
    from diffaccel.parallel.halo_conv import HaloConv2dHook
    from diffaccel.parallel.state import PatchState
    from diffusers.hooks import HookRegistry
    from diffusers.models.attention_processor import Attention

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(3)
    H, W, n = 8 * world, 6, world
    h = H // n

    def band(x):
        return x[:, :, rank * h:(rank + 1) * h]

    def full(state, y, dim=2):
        return torch.cat(state.comm.all_gather(y, layer="test", kind="output").wait(), dim=dim)

    for transport in ("p2p", "allgather"):
        cfg = PatchParallelConfig(mode="sync", halo_transport=transport, timeout_s=30)
        state = PatchState(cfg, Communicator(n, 1, 30, ByteMeter()), n)
        state.begin_call()
        state.full_hw = (H, W)
        for stride in (1, 2):
            for entry in (False, True):
                torch.manual_seed(stride)
                conv = nn.Conv2d(5, 7, 3, stride=stride, padding=1)
                x = torch.randn(2, 5, H, W, generator=g)
                ref = conv(x)
                HookRegistry.check_if_exists_or_initialize(conv).register_hook(
                    HaloConv2dHook(state, "conv", 1, entry=entry), "pp")
                y = conv(x if entry else band(x))
                out[f"conv_{transport}_s{stride}_{'entry' if entry else 'band'}"] = rel_err(full(state, y), ref)
    cfg = PatchParallelConfig(mode="sync", timeout_s=30)
    state = PatchState(cfg, Communicator(n, 1, 30, ByteMeter()), n)
    state.begin_call()
    state.full_hw = (H, W)
    for mean in (0.0, 100.0):
        gn = nn.GroupNorm(4, 8)
        with torch.no_grad():
            gn.weight.uniform_(0.5, 1.5, generator=g)
            gn.bias.uniform_(-1, 1, generator=g)
        x = mean + torch.randn(3, 8, H, W, generator=g)
        ref = gn(x)
        HookRegistry.check_if_exists_or_initialize(gn).register_hook(GlobalGroupNormHook(state, "gn"), "pp")
        out[f"groupnorm_mean{mean:g}"] = rel_err(full(state, gn(band(x))), ref)
    for qk_norm in (None, "layer_norm"):
        torch.manual_seed(4)
        attn = Attention(query_dim=16, heads=2, dim_head=8, qk_norm=qk_norm).eval()
        x = torch.randn(3, H * W, 16, generator=g)
        with torch.no_grad():
            ref = attn(x)
            attn.set_processor(PatchAttnProcessor(state, "attn", 2, attn.processor))
            y = attn(x[:, rank * h * W:(rank + 1) * h * W])
        out[f"attention_qk_norm_{qk_norm}"] = rel_err(full(state, y, dim=1), ref)
    return out


# ---------------------------------------------------------------------------------------------- MMDiT and SDXL
# zoo pipelines at tiny sizes: random-flux / random-sd3 have a VAE factor 2, so height 32 gives 8 token rows
# (Flux packs 2x2 latent patches, SD3 uses patch 2); random-sdxl's UNet down-samples once: 16 latent rows.
ZOO_RUNS = {"flux": ("random-flux", dict(prompt="a digit", height=32, width=24)),
            "sd3": ("random-sd3", dict(prompt="a digit", height=32, width=24, guidance_scale=4.0)),
            "sdxl": ("random-sdxl", dict(prompt="a digit", height=32, width=24, guidance_scale=4.0))}
_PIPES: dict[str, Any] = {}


def zoo_pipe(fam: str, dtype: torch.dtype = torch.float32):
    from diffaccel import zoo

    key = (fam, dtype)
    if key not in _PIPES:
        pipe = zoo.load(ZOO_RUNS[fam][0]).to(dtype)
        pipe.set_progress_bar_config(disable=True)
        find_denoiser(pipe).eval()
        _PIPES[key] = pipe
    return _PIPES[key]


def run_zoo(fam: str, pipe, steps: int = 2, **extra) -> torch.Tensor:
    kw = {**ZOO_RUNS[fam][1], **extra}
    return pipe(**kw, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def captured_call(fam: str, pipe) -> dict[str, Any]:
    """The keyword arguments of the pipeline's first denoiser call (its real inputs, detached copies)."""
    model = find_denoiser(pipe)
    got: dict[str, Any] = {}

    names = list(inspect.signature(model.forward).parameters)

    def grab(mod, args, kwargs):
        if not got:
            got.update({k: v.clone() if torch.is_tensor(v) else v
                        for k, v in {**dict(zip(names, args, strict=False)), **kwargs}.items()})

    hook = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_zoo(fam, pipe, steps=1)
    finally:
        hook.remove()
    got.pop("return_dict", None)
    return got


def band_sizes(fam: str, model: nn.Module, kwargs: dict[str, Any]) -> list[int]:
    """Image tokens (transformers) or feature-map rows (UNet) that every block of one call receives."""
    seen: list[int] = []
    if fam == "sdxl":
        mods = [m for n, m in model.named_modules() if type(m).__name__ == "ResnetBlock2D"]

        def pre(mod, args, kw):
            seen.append(args[0].shape[2])
    else:
        mods = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))

        def pre(mod, args, kw):
            seen.append((kw.get("hidden_states", args[0] if args else None)).shape[1])
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]
    try:
        call(model, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@scenario
def scenario_zoo_sync(rank: int, world: int) -> dict[str, Any]:
    """random-flux / random-sd3 / random-sdxl: one denoiser call (fp32) and a 2-step pipeline run (fp64, applied
    through `diffaccel.accelerate(pipe, "pp:sync")`) in sync
    mode vs the single process; what each rank's blocks see is its band (1/world of the tokens / rows)."""
    from diffaccel import accelerate

    out: dict[str, Any] = {}
    for fam in ZOO_RUNS:
        pipe = zoo_pipe(fam)
        model = find_denoiser(pipe)
        kwargs = captured_call(fam, pipe)
        ref = call(model, kwargs)
        full_sizes = band_sizes(fam, model, kwargs)
        h = parallelize(pipe, PatchParallelConfig(mode="sync", timeout_s=60))
        h.reset()
        out[f"{fam}_fp32"] = rel_err(call(model, kwargs), ref)
        out[f"{fam}_bands"] = (band_sizes(fam, model, kwargs), full_sizes)
        h.remove()
        pipe64 = zoo_pipe(fam, torch.float64)
        ref = run_zoo(fam, pipe64)
        acc = accelerate(pipe64, "pp:sync:timeout=60")  # through the protocol, as users apply it
        got = run_zoo(fam, pipe64)
        out[f"{fam}_loop_fp64"] = rel_err(got, ref)
        out[f"{fam}_sha"] = hashlib.sha256(got.numpy().tobytes()).hexdigest()
        acc.remove()
        if fam != "flux":  # SD3 / SDXL batch CFG: the two halves on two rank groups
            acc = accelerate(pipe64, "pp:sync:cfg:timeout=60")
            out[f"{fam}_loop_fp64_cfg"] = rel_err(run_zoo(fam, pipe64), ref)
            acc.remove()
    return out


@scenario
def scenario_sd35_sync(rank: int, world: int) -> dict[str, float]:
    """SD3.5-style blocks (a second, image-only self-attention `attn2` and RMS q/k norms) from a tiny config:
    one sync call in fp32 vs the single process."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(2, 4, 16, 12, generator=g), "timestep": torch.tensor([500, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
              "pooled_projections": torch.randn(2, 32, generator=g)}
    ref = call(model, inputs)
    h = parallelize(model, PatchParallelConfig(mode="sync", timeout_s=60))
    h.reset()
    got = call(model, inputs)
    h.remove()
    return {"fp32": rel_err(got, ref), "attn2_layers": sum(1 for b in model.transformer_blocks if b.attn2 is not None)}


@scenario
def scenario_zoo_errors(rank: int, world: int) -> dict[str, Any]:
    """Heights that do not split into whole bands are refused with the reason on every rank; the pipeline works
    afterwards; Flux refuses cfg_parallel (its pipeline does not batch guidance)."""
    out: dict[str, Any] = {}
    for fam in ZOO_RUNS:
        pipe = zoo_pipe(fam)
        h = parallelize(pipe, PatchParallelConfig(mode="sync", timeout_s=30))
        if fam == "sdxl":  # the pipeline itself keeps latent heights a multiple of 4: call the UNet directly with
            # 2 * (world + 1) latent rows, even (one down-sampling) but not a multiple of 2 * world
            kwargs = captured_call(fam, pipe)
            kwargs["sample"] = kwargs["sample"][:, :, :2 * (world + 1)]
            out[f"{fam}_uneven"] = _error_of(lambda pipe=pipe, kwargs=kwargs: call(find_denoiser(pipe), kwargs))
        else:  # 4 * (2 * world + 1) pixels: an odd number of token rows
            out[f"{fam}_uneven"] = _error_of(lambda pipe=pipe, fam=fam: run_zoo(fam, pipe, steps=1,
                                                                                  height=4 * (2 * world + 1)))
        h.reset()
        out[f"{fam}_after"] = tuple(run_zoo(fam, pipe, steps=1).shape)
        h.remove()
    out["flux_cfg_parallel"] = _error_of(lambda: parallelize(zoo_pipe("flux"), PatchParallelConfig(
        mode="sync", cfg_parallel=True, timeout_s=30)))
    return out


def mmdit_expected_bytes(model: nn.Module, kwargs: dict[str, Any], n: int, r: int, mode: str, phase: str,
                         f: float, elt: int) -> dict[str, int]:
    """Closed-form bytes for an MMDiT: image K/V only (text K/V never travel), per attention layer;
    output gather of the rank's tokens. `grid` = (token rows, token columns) of the whole image."""
    x = kwargs["hidden_states"]
    B = x.shape[0]
    if x.ndim == 4:  # SD3: patch tokens of the latent
        p = model.config.patch_size
        rows, cols = x.shape[2] // p, x.shape[3] // p
        out_band = x.shape[1] * (x.shape[2] // n) * x.shape[3]
    else:  # Flux: packed tokens
        cols = int((kwargs["img_ids"][:, 1] == 0).sum())
        rows = x.shape[1] // cols
        out_band = (rows // n) * cols * model.out_channels
    attns = [m for m in model.modules() if type(m).__name__ in ("Attention", "FluxAttention")]
    exp = dict.fromkeys(("attn_kv", "conv_halo", "gn_stats", "output"), 0)
    for m in attns:
        C = m.to_k.out_features
        if phase == "sync" or mode == "displaced":
            exp["attn_kv"] += (n - 1) * 2 * C * (rows // n) * cols * B * elt
        elif mode == "pcpp":
            exp["attn_kv"] += ((r > 0) + (r < n - 1)) * pcpp_rows(f, rows // n) * cols * 2 * C * B * elt
    exp["output"] = (n - 1) * B * out_band * elt
    return exp


@scenario
def scenario_mmdit_displaced(rank: int, world: int) -> dict[str, Any]:
    """Flux and SD3, fp32 unless said: displaced fixed point (same input every call equals sync), bytes per kind
    vs closed forms for every mode, and (Flux, fp64) the first-order error of a displaced call."""
    out: dict[str, Any] = {}
    f = 0.5
    for fam in ("flux", "sd3"):
        pipe = zoo_pipe(fam)
        model = find_denoiser(pipe)
        kwargs = captured_call(fam, pipe)
        ref = call(model, kwargs)
        h = parallelize(model, PatchParallelConfig(mode="displaced", warmup_steps=1, timeout_s=60))
        h.reset()
        errs = [rel_err(call(model, kwargs), ref) for _ in range(4)]
        h.remove()
        out[f"{fam}_fixed_point"] = max(errs[2:])
        for mode in ("sync", "displaced", "pcpp", "naive"):
            h = parallelize(model, PatchParallelConfig(mode=mode, warmup_steps=0, pcpp_fraction=f, timeout_s=60))
            h.reset()
            call(model, kwargs)
            y = call(model, kwargs)
            per_call = h.meter.per_call()
            h.remove()
            if mode != "sync":
                out[f"{fam}_{mode}_vs_fresh"] = rel_err(y, ref)
            for i, phase in ((0, "sync"), (1, "sync" if mode == "sync" else "displaced")):
                got = {k: v for k, v in per_call[i].items() if k != "other"}
                out[f"{fam}_{mode}_bytes{i}"] = (got, mmdit_expected_bytes(model, kwargs, world, rank, mode, phase,
                                                                           f, 4))
    model = find_denoiser(zoo_pipe("flux", torch.float64))
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in captured_call("flux", zoo_pipe("flux")).items()}
    x = kwargs["hidden_states"]
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    deltas = (1e-2, 1e-3, 1e-4)
    refs = [call(model, with_sample(kwargs, "hidden_states", x + delta * d)) for delta in deltas]
    h = parallelize(model, PatchParallelConfig(mode="displaced", warmup_steps=0, timeout_s=60))
    errs = []
    for delta, r in zip(deltas, refs, strict=True):
        h.reset()
        call(model, kwargs)
        errs.append(float((call(model, with_sample(kwargs, "hidden_states", x + delta * d)) - r).abs().max()))
    h.remove()
    out["flux_first_order"] = errs
    return out


@scenario
def scenario_zoo_compose(rank: int, world: int) -> dict[str, Any]:
    """Compositions through the protocol on random-flux (fp64, 4 steps): patch parallelism (sync) with a feature
    cache (FORA-2, a forecast FORA-2, diffusers' TaylorSeer) and with a flow sampler (S-PNDM), each against the
    same recipe without `pp:sync` on one process. Every rank must run the same cache decisions: these caches'
    schedules depend on the step only, so each rank reuses (or forecasts) exactly its band of what one process
    would, and the results agree to the fp64 reduction-order floor."""
    from diffaccel import accelerate

    pipe = zoo_pipe("flux", torch.float64)
    out: dict[str, Any] = {}
    for recipe in ("fora:2:steps=4", "fora:2:steps=4:forecast=1", "taylorseer:2", "s-pndm@4",
                   "s-pndm@4 + fora:2:steps=4"):
        acc = accelerate(pipe, recipe)
        ref = run_zoo("flux", pipe, steps=4)
        acc.remove()
        acc = accelerate(pipe, f"{recipe} + pp:sync:timeout=60")
        got = run_zoo("flux", pipe, steps=4)
        out[recipe] = {"err": rel_err(got, ref), "sha": hashlib.sha256(got.numpy().tobytes()).hexdigest(),
                       "notes": list(acc.notes)}
        acc.remove()
    plain = run_zoo("flux", pipe, steps=4)
    acc = accelerate(pipe, "fora:2:steps=4")
    out["fora_changes_output"] = rel_err(run_zoo("flux", pipe, steps=4), plain)
    acc.remove()
    return out
