"""Training scripts for every trained zoo entry: `diffaccel zoo train NAME` reproduces the shipped weights.

(Over 450 lines on purpose: one short trainer per zoo entry, side by side, so the recipe of every shipped weight
file is read in one place.)

Each trainer is seeded, runs a fixed number of iterations on the CPU, saves with `save_pretrained` into the
entry's folder (weights stored as float16 safetensors to keep the zoo small, except the feature extractor which
stays float32), and writes a model card with the command, wall time, machine and measured quality.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.files import atomic_save
from ..core.seeding import seed_everything
from . import architectures as arch
from .data import CAPTION_TEMPLATES, augment_shift, caption, dataset_hash, load_split
from .paths import weights_dir

DIGIT_CLASSES = 10


@dataclass
class TrainSettings:
    iterations: int
    batch_size: int
    lr: float
    warmup: int = 100
    ema: float | None = None
    seed: int = 0


# Settings that produced the shipped weights. `--iterations` overrides them for quick runs.
SETTINGS: dict[str, TrainSettings] = {
    "digits-features": TrainSettings(iterations=400, batch_size=128, lr=2e-3, warmup=30),
    "digits-vae": TrainSettings(iterations=700, batch_size=64, lr=1e-3, warmup=50),
    "digits-clip": TrainSettings(iterations=500, batch_size=128, lr=1e-3, warmup=50),
    "digits-sd": TrainSettings(iterations=1600, batch_size=128, lr=1e-3, warmup=200, ema=0.995),
    "digits-dit": TrainSettings(iterations=2000, batch_size=128, lr=1e-3, warmup=200, ema=0.995),
    "digits-ddpm": TrainSettings(iterations=3000, batch_size=64, lr=1e-3, warmup=100, ema=0.999),
    "digits-flux": TrainSettings(iterations=1800, batch_size=128, lr=1e-3, warmup=200, ema=0.995),
}


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class EMA:
    """Exponential moving average of a module's parameters (the weights we ship)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - d)


def _loop(name: str, model: torch.nn.Module, loss_fn: Callable[[int, torch.Generator], torch.Tensor],
          s: TrainSettings, params=None) -> torch.nn.Module:
    """The shared optimisation loop: AdamW, warm-up then cosine, grad-clip 1.0, optional EMA; returns what to save."""
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s.warmup, s.iterations))
    ema = EMA(model, s.ema) if s.ema else None
    model.train()
    bar = tqdm(range(s.iterations), desc=f"train {name}", file=sys.stderr, mininterval=2.0)
    avg = None
    for step in bar:
        loss = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema:
            ema.update(model, step)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
    model.eval()
    out = ema.shadow if ema else model
    out.final_loss = avg  # type: ignore[attr-defined]
    return out


def _batch_idx(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (b,), generator=gen)


# --------------------------------------------------------------------------------------------------- trainers
def train_features(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    from .features import DigitsClassifier

    data = load_split("train")
    model = DigitsClassifier()

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        x = augment_shift(data.images[i], gen, max_shift=2)
        return F.cross_entropy(model.logits_from_normalized(x), data.labels[i], label_smoothing=0.05)

    model = _loop("digits-features", model, loss_fn, s)
    test = load_split("test")
    with torch.no_grad():
        acc = (model.logits_from_normalized(test.images).argmax(1) == test.labels).float().mean().item()
    return model, {"test_accuracy": acc, "final_loss": model.final_loss}


def _load_features():
    from . import load

    return load("digits-features")


def train_vae(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    data = load_split("train")
    vae = arch.build("vae")
    feats = _load_features().requires_grad_(False)

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        x = augment_shift(data.images[i], gen, max_shift=1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        perceptual = F.mse_loss(feats.features_from_normalized(rec), feats.features_from_normalized(x))
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 0.05 * perceptual + 1e-4 * kl

    vae = _loop("digits-vae", vae, loss_fn, s)
    with torch.no_grad():
        lat = vae.encode(data.images).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        test = load_split("test")
        rec = vae.decode(vae.encode(test.images).latent_dist.mean).sample.clamp(-1, 1)
        acc = (feats.logits_from_normalized(rec).argmax(1) == test.labels).float().mean().item()
        mse = F.mse_loss(rec, test.images).item()
    return vae, {"recon_test_accuracy": acc, "recon_test_mse": mse, "scaling_factor": vae.config.scaling_factor,
                 "final_loss": vae.final_loss}


def _clip_pixel_values(x: torch.Tensor) -> torch.Tensor:
    # Same as the saved CLIPImageProcessor: [0, 1] RGB, normalised with mean = std = 0.5, i.e. [-1, 1] x 3.
    return x.expand(-1, 3, -1, -1)


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    from transformers import CLIPConfig, CLIPModel

    from .tokenizer import build_tokenizer

    data = load_split("train")
    tok = build_tokenizer(tempfile.mkdtemp(prefix="diffaccel-tok-"))
    torch.manual_seed(s.seed)
    config = CLIPConfig(text_config=arch.clip_text_config(len(tok)), vision_config=arch.clip_vision_config(),
                        projection_dim=arch.TEXT_DIM)
    model = CLIPModel(config)
    n_t = len(CAPTION_TEMPLATES)
    ids = _tokenize(tok, [caption(k, t) for k in range(DIGIT_CLASSES) for t in range(n_t)])

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        y = data.labels[i]
        t = torch.randint(0, n_t, (len(i),), generator=gen)
        x = augment_shift(data.images[i], gen, max_shift=1)
        out = model(input_ids=ids[y * n_t + t], pixel_values=_clip_pixel_values(x))
        # Several images of a batch share a class: every same-class pair is a positive (soft targets).
        same = (y[:, None] == y[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * F.log_softmax(out.logits_per_image, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(out.logits_per_text, 1), 1).mean())

    model = _loop("digits-clip", model, loss_fn, s)
    test = load_split("test")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_clip_pixel_values(test.images))
        txt = model.get_text_features(input_ids=_tokenize(tok, [caption(k) for k in range(DIGIT_CLASSES)]))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        pred = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).argmax(1)
        acc = (pred == test.labels).float().mean().item()
    model.tokenizer = tok  # type: ignore[attr-defined]
    return model, {"zero_shot_test_accuracy": acc, "final_loss": model.final_loss}


def _text_encoder_from_clip(clip):
    """The text tower of a trained CLIPModel as a stand-alone CLIPTextModel (what StableDiffusionPipeline takes)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    src = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    if not set(src) & set(text.state_dict()):  # transformers < 5 wraps the tower in a `text_model` attribute
        src = {f"text_model.{k}": v for k, v in src.items()}
    text.load_state_dict(src)
    ids = torch.arange(6)[None] + 300
    with torch.no_grad():
        if not torch.equal(text(input_ids=ids).last_hidden_state, clip.text_model(input_ids=ids).last_hidden_state):
            raise RuntimeError("text encoder extracted from digits-clip does not reproduce its text tower")
    return text.eval()


def _encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        post = vae.encode(images).latent_dist
    return post.mean, post.std


def train_sd(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    from diffusers import DDPMScheduler

    from . import load

    data = load_split("train")
    vae = load("digits-vae")
    clip = load("digits-clip")
    tok = load_tokenizer()
    text_model = clip.text_model.eval().requires_grad_(False)
    mean, std = _encode_latents(vae, data.images)
    sf = vae.config.scaling_factor
    n_t = len(CAPTION_TEMPLATES)
    texts = [caption(k, t) for k in range(DIGIT_CLASSES) for t in range(n_t)] + [""]
    with torch.no_grad():
        emb = text_model(input_ids=_tokenize(tok, texts)).last_hidden_state
    unet = arch.build("sd")
    noise_sched = DDPMScheduler(**sd_scheduler_config())

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        z = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=gen)) * sf
        t_idx = torch.randint(0, n_t, (len(i),), generator=gen)
        e_idx = data.labels[i] * n_t + t_idx
        drop = torch.rand(len(i), generator=gen) < 0.1  # caption dropout -> classifier-free guidance
        e_idx = torch.where(drop, torch.full_like(e_idx, len(texts) - 1), e_idx)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(i),), generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=emb[e_idx]).sample
        return F.mse_loss(pred, noise)

    unet = _loop("digits-sd", unet, loss_fn, s)
    return unet, {"final_loss": unet.final_loss}


def train_dit(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    from diffusers import DDPMScheduler

    from . import load

    data = load_split("train")
    vae = load("digits-vae")
    mean, std = _encode_latents(vae, data.images)
    sf = vae.config.scaling_factor
    dit = arch.build("dit")
    noise_sched = DDPMScheduler(**dit_scheduler_config())

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        z = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=gen)) * sf
        y = data.labels[i]
        y = torch.where(torch.rand(len(i), generator=gen) < 0.1, torch.full_like(y, arch.NULL_CLASS), y)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(i),), generator=gen)
        pred = dit(noise_sched.add_noise(z, noise, t), timestep=t, class_labels=y).sample
        return F.mse_loss(pred, noise)

    # The label embedding would drop labels itself in train mode; we drop them explicitly (seeded) instead.
    dit.pos_embed  # noqa: B018 - make sure this is a patch-embedding DiT
    for m in dit.modules():
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    dit = _loop("digits-dit", dit, loss_fn, s)
    for m in dit.modules():
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = 0.1
    return dit, {"final_loss": dit.final_loss}


def train_ddpm(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    from diffusers import DDPMScheduler

    data = load_split("train")
    unet = arch.build("ddpm")
    noise_sched = DDPMScheduler(**ddpm_scheduler_config())

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        x = augment_shift(data.images[i], gen, max_shift=1)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(i),), generator=gen)
        return F.mse_loss(unet(noise_sched.add_noise(x, noise, t), t).sample, noise)

    unet = _loop("digits-ddpm", unet, loss_fn, s)
    return unet, {"final_loss": unet.final_loss}


def flux_text_encoders():
    """digits-flux's text side: (CLIP tokenizer, CLIP text tower of digits-clip, T5 tokenizer, tiny T5 encoder).

    The CLIP tower gives the pooled embedding (trained contrastively on the captions); the T5 encoder is a seeded,
    randomly initialised, frozen `T5EncoderModel` in the standard layout (no T5 pre-training is possible offline).
    """
    from transformers import T5Config, T5EncoderModel

    from . import load
    from .tokenizer import build_t5_tokenizer

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        t5_tok = build_t5_tokenizer(arch.FLUX_MAX_SEQUENCE_LENGTH)
        t5 = T5EncoderModel(T5Config(**arch.t5_encoder_config(len(t5_tok)))).eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(state)
    clip_text = _text_encoder_from_clip(load("digits-clip")).requires_grad_(False)
    return load_tokenizer(), clip_text, t5_tok, t5


def flux_shift_mu(image_seq_len: int) -> float:
    """FluxPipeline's `mu` (log of the exponential time shift) for a latent of `image_seq_len` packed tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = arch.flux_scheduler_config()
    return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                           c["max_shift"])


def train_flux(s: TrainSettings) -> tuple[torch.nn.Module, dict]:
    """Rectified-flow training of a FluxTransformer2DModel (velocity target noise - x0, as FlowMatchEuler expects).

    Noise levels: logit-normal (SD3, Esser et al. 2024, eq. 19) pushed through the same exponential time shift
    FluxPipeline samples with at this resolution, so training and sampling see the same sigmas.
    Captions are dropped to "" 10% of the time, which makes true classifier-free guidance (`true_cfg_scale`) work.
    """
    from diffusers import FluxPipeline

    from . import load

    data = load_split("train")
    vae = load("digits-vae")
    mean, std = _encode_latents(vae, data.images)
    sf = vae.config.scaling_factor
    clip_tok, clip_text, t5_tok, t5 = flux_text_encoders()
    n_t = len(CAPTION_TEMPLATES)
    texts = [caption(k, t) for k in range(DIGIT_CLASSES) for t in range(n_t)] + [""]
    with torch.no_grad():
        pooled = clip_text(input_ids=_tokenize(clip_tok, texts)).pooler_output
        ids = t5_tok(texts, padding="max_length", max_length=arch.FLUX_MAX_SEQUENCE_LENGTH, truncation=True,
                     return_tensors="pt").input_ids
        seq = t5(ids).last_hidden_state
    flux = arch.build("flux")
    c, h, w = mean.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(arch.FLUX_MAX_SEQUENCE_LENGTH, 3)
    mu = flux_shift_mu(img_ids.shape[0])

    def loss_fn(step, gen):
        i = _batch_idx(len(data), s.batch_size, gen)
        b = len(i)
        z = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=gen)) * sf
        e_idx = data.labels[i] * n_t + torch.randint(0, n_t, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < 0.1
        e_idx = torch.where(drop, torch.full_like(e_idx, len(texts) - 1), e_idx)
        u = torch.sigmoid(torch.randn(b, generator=gen))
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        noise = torch.randn(z.shape, generator=gen)
        x_t = (1 - sigma[:, None, None, None]) * z + sigma[:, None, None, None] * noise
        pred = flux(hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w), timestep=sigma,
                    pooled_projections=pooled[e_idx], encoder_hidden_states=seq[e_idx], txt_ids=txt_ids,
                    img_ids=img_ids, return_dict=False)[0]
        return F.mse_loss(pred, FluxPipeline._pack_latents(noise - z, b, c, h, w))

    flux = _loop("digits-flux", flux, loss_fn, s)
    return flux, {"final_loss": flux.final_loss}


# --------------------------------------------------------------------------------------------------- schedules
def sd_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


def dit_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")


ddpm_scheduler_config = dit_scheduler_config


def sampling_scheduler(kind: str):
    """The scheduler each pipeline ships with: DDIM (eta 0) on the training schedule."""
    from diffusers import DDIMScheduler

    base = {"sd": sd_scheduler_config, "dit": dit_scheduler_config, "ddpm": ddpm_scheduler_config}[kind]()
    return DDIMScheduler(**base, clip_sample=(kind == "ddpm"), set_alpha_to_one=False, steps_offset=1)


def load_tokenizer():
    from transformers import CLIPTokenizer

    from .tokenizer import MODEL_MAX_LENGTH

    return CLIPTokenizer.from_pretrained(str(weights_dir() / "digits-clip"), model_max_length=MODEL_MAX_LENGTH)


# --------------------------------------------------------------------------------------------------- saving
def _save_entry(name: str, model, metrics: dict, settings: TrainSettings, seconds: float, out_root: Path) -> Path:
    """Assemble the entry's folder in a temporary directory, then swap it in (never a half-written entry)."""
    from diffusers import (
        DDPMPipeline,
        DiTPipeline,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPProcessor

    from . import load
    from .data import DIGIT_WORDS

    def write(tmp: Path) -> None:
        half = torch.float16
        if name == "digits-features":
            model.save_pretrained(tmp)
        elif name == "digits-vae":
            copy.deepcopy(model).to(half).save_pretrained(tmp)
        elif name == "digits-clip":
            copy.deepcopy(model).to(half).save_pretrained(tmp)
            image_processor = CLIPImageProcessor(
                do_resize=True, size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32},
                do_rescale=True, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                do_convert_rgb=True,
            )
            CLIPProcessor(image_processor=image_processor, tokenizer=model.tokenizer).save_pretrained(tmp)
        elif name == "digits-ddpm":
            DDPMPipeline(unet=copy.deepcopy(model).to(half), scheduler=sampling_scheduler("ddpm")).save_pretrained(tmp)
        elif name == "digits-sd":
            text = _text_encoder_from_clip(load("digits-clip"))
            pipe = StableDiffusionPipeline(
                vae=load("digits-vae"), text_encoder=text, tokenizer=load_tokenizer(), unet=copy.deepcopy(model),
                scheduler=sampling_scheduler("sd"), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.to(half).save_pretrained(tmp)
        elif name == "digits-dit":
            id2label = {i: w for i, w in enumerate(DIGIT_WORDS)}
            pipe = DiTPipeline(transformer=copy.deepcopy(model), vae=load("digits-vae"),
                               scheduler=sampling_scheduler("dit"), id2label=id2label)
            pipe.to(half).save_pretrained(tmp)
            # DiTPipeline does not store id2label; keep it beside the pipeline so `zoo.load` can pass it back.
            (tmp / "id2label.json").write_text(json.dumps(id2label, indent=1))
        elif name == "digits-flux":
            clip_tok, clip_text, t5_tok, t5 = flux_text_encoders()
            vae = load("digits-vae")
            vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scaling_factor + shift_factor
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**arch.flux_scheduler_config()), vae=vae,
                                text_encoder=clip_text, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                                transformer=copy.deepcopy(model))
            pipe.to(half).save_pretrained(tmp)
        else:
            raise KeyError(name)
        # from_pretrained records where a component came from; that is a path of the training machine, not ours to ship.
        for cfg_file in tmp.rglob("config.json"):
            cfg = json.loads(cfg_file.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        card = {
            "name": name,
            "command": f"diffaccel zoo train {name}"
            + ("" if settings == SETTINGS[name] else f" --iterations {settings.iterations}")
            + ("" if torch.get_num_threads() == 2 else f" --threads {torch.get_num_threads()}"),
            "settings": settings.__dict__,
            "train_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "dataset_sha256": dataset_hash(),
            "train_metrics": metrics,
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=1))

    return atomic_save(out_root / name, write, directory=True)


TRAINERS = {
    "digits-features": train_features,
    "digits-vae": train_vae,
    "digits-clip": train_clip,
    "digits-sd": train_sd,
    "digits-dit": train_dit,
    "digits-ddpm": train_ddpm,
    "digits-flux": train_flux,
}
# digits-sd and digits-dit need the VAE; digits-sd needs the CLIP text tower; the VAE needs the extractor.
TRAIN_ORDER = ["digits-features", "digits-vae", "digits-clip", "digits-sd", "digits-dit", "digits-ddpm", "digits-flux"]


def train(name: str, iterations: int | None = None, out_root: str | Path | None = None, threads: int = 2,
          quality_samples: int = 500) -> Path:
    """Train one zoo entry from scratch and write it (weights + card.json + README.md) into the zoo's weights folder.

    Generators are then sampled (`quality_samples` images, 0 to skip) and scored; the result goes into the card.
    """
    if name not in TRAINERS:
        raise InputError(f"unknown trainable zoo entry {name!r}; trainable: {', '.join(TRAIN_ORDER)}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(name, iterations, out_root, quality_samples)
    finally:  # a library call leaves the caller's thread count as it was
        torch.set_num_threads(previous_threads)


def _train(name: str, iterations: int | None, out_root: str | Path | None, quality_samples: int) -> Path:
    from .registry import load_from, record_digests

    s = copy.copy(SETTINGS[name])
    if iterations is not None:
        s.iterations = int(iterations)
    seed_everything(s.seed, deterministic=True)
    t0 = time.time()
    model, metrics = TRAINERS[name](s)
    seconds = time.time() - t0
    root = Path(out_root) if out_root else weights_dir()
    try:
        path = _save_entry(name, model, metrics, s, seconds, root)
    except Exception as exc:
        rescue = root / f".{name}-unassembled"
        model.save_pretrained(str(rescue))
        raise RuntimeError(f"training of {name} finished but assembling the entry failed; the trained network is "
                           f"saved in {rescue}") from exc
    if quality_samples and name in ("digits-sd", "digits-dit", "digits-ddpm", "digits-flux"):
        # Quality floor of what was written (float16-stored weights, loaded back as float32), into the card.
        from .quality import DEFAULT_STEPS, FLUX_TRUE_CFG, measure_quality

        pipe = load_from(name, path, torch.device("cpu"), torch.float32)
        steps = DEFAULT_STEPS.get(name, 25)
        quality = measure_quality(name, n=quality_samples, steps=steps, seed=0, pipe=pipe)
        card_file = path / "card.json"
        card = json.loads(card_file.read_text())
        sampler = "shipped " + ("FlowMatchEulerDiscreteScheduler" if name == "digits-flux" else "DDIMScheduler (eta=0)")
        card["quality"] = {**quality, "sampler": sampler,
                           "guidance": {"digits-sd": 7.5, "digits-dit": 4.0}.get(name)}
        if name == "digits-flux":  # also with true classifier-free guidance (the caption dropout trained it)
            q = measure_quality(name, n=quality_samples, steps=steps, seed=0, pipe=pipe, guidance=FLUX_TRUE_CFG)
            card["quality_true_cfg"] = {**q, "sampler": sampler,
                                        "guidance": {"true_cfg_scale": FLUX_TRUE_CFG, "negative_prompt": ""}}
        card_file.write_text(json.dumps(card, indent=1))
    write_model_card(path)
    record_digests(path)  # last: the card records the SHA-256 of every file written above
    return path


def write_model_card(path: str | Path) -> Path:
    """Render an entry's card.json as the human-readable model card README.md beside the weights."""
    path = Path(path)
    card = json.loads((path / "card.json").read_text())
    n_params = 0
    from safetensors import safe_open

    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            n_params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    lines = [
        f"# {card['name']}",
        "",
        "Part of the diffaccel model zoo: trained from scratch on scikit-learn's `load_digits` (fixed 1437/360 "
        "split, upsampled to 32x32) by the command below. Weights: safetensors"
        + (" (float32)." if card["name"] == "digits-features" else " stored as float16, loaded as float32."),
        "",
        f"- command: `{card['command']}`",
        f"- settings: `{json.dumps(card['settings'])}`",
        f"- wall time: {card['train_seconds']} s on {card['machine']}",
        f"- parameters (all files in this folder): {n_params:,}",
        f"- dataset sha256: `{card['dataset_sha256']}`",
        f"- training metrics: `{json.dumps(card['train_metrics'])}`",
    ]
    if "quality" in card:
        lines.append(f"- quality (digits-features classifier): `{json.dumps(card['quality'])}`")
    if "quality_true_cfg" in card:
        lines.append(f"- quality with true classifier-free guidance: `{json.dumps(card['quality_true_cfg'])}`")
    if card["name"] == "digits-flux":
        lines += ["", "Call it as `pipe(prompt, height=32, width=32, max_sequence_length=16)` (`diffaccel.zoo.load` "
                  "sets the 32x32 default; the T5 length is in `tokenizer_2`'s config, which the Flux family reads). "
                  "Text: digits-clip's text tower gives the pooled embedding; the T5 encoder is a seeded, randomly "
                  "initialised and frozen tiny `T5EncoderModel` (no T5 pre-training offline). The VAE is digits-vae "
                  "with `shift_factor` 0. Training: rectified flow (velocity `noise - x0`), logit-normal noise levels "
                  "through FluxPipeline's dynamic time shift at 16 latent tokens, captions dropped 10% of the time."]
    (path / "README.md").write_text("\n".join(lines) + "\n")
    return path / "README.md"
