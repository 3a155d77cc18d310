"""The zoo's entries and `load(name)`: ready diffusers pipelines and models from weights shipped in the repo."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.device import resolve_device, resolve_dtype
from ..core.errors import InputError, WeightsError
from ..core.files import atomic_write_text
from ..core.weights import CARD, check_finite_parameters, check_safetensors, digest_folder, verify_digests
from .data import IMAGE_SIZE
from .paths import weights_dir


class ZooError(WeightsError):
    """A zoo entry cannot be loaded: missing or corrupt weight files (exit code 3); the message names the fix."""


class UnknownModelError(ZooError, InputError):
    """A name that is not a zoo entry (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # what `load` returns
    description: str
    trained: bool  # weights ship in the repo (False: built from a config with random weights)


ENTRIES: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("digits-features", "DigitsClassifier", "CNN classifier; penultimate features for FID/KID", True),
    ZooEntry("digits-vae", "AutoencoderKL", "1x32x32 <-> 4x8x8 latent autoencoder", True),
    ZooEntry("digits-clip", "CLIPModel", "tiny CLIP trained on digits and their captions", True),
    ZooEntry("digits-ddpm", "DDPMPipeline", "pixel-space UNet2DModel, epsilon, 1000-step linear schedule", True),
    ZooEntry("digits-sd", "StableDiffusionPipeline", "text-to-image latent UNet2DConditionModel + CLIP text", True),
    ZooEntry("digits-dit", "DiTPipeline", "class-conditional DiTTransformer2DModel on digits-vae latents", True),
    ZooEntry("digits-flux", "FluxPipeline", "rectified-flow FluxTransformer2DModel + CLIP (pooled) and T5 text",
             True),
    ZooEntry("digits-sd-onestep", "RectifiedFlowPipeline", "one-step student distilled from digits-sd via 2-RF", True),
    ZooEntry("digits-flux-onestep", "FluxPipeline", "one-step student distilled from digits-flux via 2-RF "
             "(num_inference_steps=1)", True),
    ZooEntry("random-ddpm", "DDPMPipeline", "random-weight tiny UNet2DModel pipeline", False),
    ZooEntry("random-sd", "StableDiffusionPipeline", "random-weight tiny SD pipeline", False),
    ZooEntry("random-dit", "DiTPipeline", "random-weight tiny DiT pipeline", False),
    ZooEntry("random-pixart", "PixArtAlphaPipeline", "random-weight tiny PixArt-alpha pipeline with a tiny T5", False),
    ZooEntry("random-sd15-unet", "UNet2DConditionModel", "full-size SD-1.5 UNet config, random weights", False),
    ZooEntry("random-dit-xl-2", "DiTTransformer2DModel", "full-size DiT-XL/2 (256px) config, random weights", False),
    ZooEntry("random-flux", "FluxPipeline", "random-weight tiny Flux pipeline (CLIP + T5 text)", False),
    ZooEntry("random-sd3", "StableDiffusion3Pipeline", "random-weight tiny SD3 pipeline (2 CLIP + T5 text)", False),
    ZooEntry("random-sdxl", "StableDiffusionXLPipeline", "random-weight tiny SDXL pipeline (2 CLIP text)", False),
    ZooEntry("random-flux-dev", "FluxTransformer2DModel",
             "FLUX.1-dev transformer at full width, 2 of 19 double + 4 of 38 single blocks, random weights", False),
    ZooEntry("random-sd3-medium", "SD3Transformer2DModel", "full-size SD3-Medium transformer config, random weights",
             False),
    ZooEntry("random-sdxl-unet", "UNet2DConditionModel", "full-size SDXL base UNet config (2.6B), random weights",
             False),
]}


#: entries not built by `diffaccel zoo train`: how to recreate their weights instead
RETRAIN_HINTS: dict[str, str] = {
    "digits-sd-onestep": "recreate it with the `diffaccel distill` stages (pairs, reflow, pairs, one-step, then "
                         "`python -m diffaccel.distill.export`) listed in distill/README.md",
    "digits-flux-onestep": "recreate it with the `diffaccel distill` stages (pairs from digits-flux, reflow, one-step, "
                           "then `python -m diffaccel.distill.export`): the exact commands are in its card and in "
                           "distill/README.md",
}


def list_models() -> list[str]:
    return list(ENTRIES)


def entry_path(name: str) -> Path:
    return weights_dir() / name


def _check_entry(name: str, hash_files: bool = True) -> Path:
    """The entry's folder, after checking it: every file the card lists exists and (with `hash_files`) has the
    recorded SHA-256; without digests in the card, every safetensors header must read."""
    if name not in ENTRIES:
        raise UnknownModelError(f"unknown zoo model {name!r}; valid names: {', '.join(ENTRIES)}")
    path = entry_path(name)
    if not ENTRIES[name].trained:
        return path
    hint = retrain_hint(name)
    if not path.is_dir():
        raise ZooError(f"zoo model {name!r}: weight folder {path} is missing; {hint}")
    try:
        digests = card_digests(path)
        if digests:  # the card records every file's SHA-256: a damaged or missing file is named
            verify_digests(path, digests if hash_files else {}, fix=hint, what=f"zoo model {name!r} ({path})")
            missing = sorted(rel for rel in digests if not (path / rel).is_file())
            if missing:
                raise ZooError(f"zoo model {name!r} ({path}): file {missing[0]} is missing; {hint}")
            return path
        weight_files = sorted(path.rglob("*.safetensors"))  # no digests recorded (a card from before they were)
        if not weight_files:
            raise ZooError(f"zoo model {name!r}: no .safetensors weight file under {path}; {hint}")
        for f in weight_files:
            check_safetensors(f, fix=hint, what=f"zoo model {name!r} ({path})")
    except ZooError:
        raise
    except WeightsError as exc:
        raise ZooError(str(exc)) from exc
    return path


def load(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """Load a zoo entry fully offline: a diffusers pipeline (or a model) ready on `device` in `dtype` (fp32 default).

    >>> pipe = load("digits-sd")            # StableDiffusionPipeline
    >>> image = pipe("a handwritten digit seven", num_inference_steps=25).images[0]
    """
    path = _check_entry(name, hash_files=False)  # names a missing file at once; the digests are checked below
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    digests = card_digests(path) if ENTRIES[name].trained else {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        # hashing runs beside loading (hashlib releases the GIL), so verification adds little wall time; the
        # loaded object is returned only after every file matched its recorded SHA-256
        check = pool.submit(verify_digests, path, digests, fix=retrain_hint(name), what=f"zoo model {name!r} ({path})")
        try:
            loaded = load_from(name, path, dev, dt)
        except Exception:
            _digest_result(check)  # a damaged file explains a failed load better than the loader's own error
            raise
        _digest_result(check)
    if ENTRIES[name].trained:
        try:
            check_finite_parameters(loaded, fix=retrain_hint(name), what=f"zoo model {name!r}")
        except WeightsError as exc:
            raise ZooError(str(exc)) from exc
    return loaded


def _digest_result(check) -> None:
    try:
        check.result()
    except ZooError:
        raise
    except WeightsError as exc:
        raise ZooError(str(exc)) from exc


def retrain_hint(name: str) -> str:
    """The command that recreates a trained entry's weights."""
    return RETRAIN_HINTS.get(name, f"run `diffaccel zoo train {name}` to recreate it")


def record_digests(path: str | Path) -> dict[str, str]:
    """(Re)write `path`/card.json with the SHA-256 of every other file in the entry's folder; `load` verifies them.

    Run last, after everything in the folder is written (the zoo's trainers and the distill export do).
    """
    path = Path(path)
    f = path / CARD
    card = json.loads(f.read_text()) if f.is_file() else {"name": path.name}
    card["files"] = digest_folder(path)
    atomic_write_text(f, json.dumps(card, indent=1) + "\n")
    return card["files"]


def card_digests(path: Path) -> dict[str, str]:
    """``{file: sha256}`` recorded in an entry's card.json (empty when the card records none)."""
    f = path / CARD
    try:
        files = json.loads(f.read_text()).get("files") if f.is_file() else None
    except (OSError, ValueError) as exc:
        raise ZooError(f"{f} is damaged ({exc})") from exc
    return dict(files) if isinstance(files, dict) else {}


def load_from(name: str, path: Path, dev: torch.device, dt: torch.dtype):
    """Load entry `name` from an explicit folder (used by `load` and by the trainers on what they just wrote)."""
    if not ENTRIES[name].trained:
        from .random_models import build_random

        model = build_random(name)
        return model.to(dev) if dt == torch.float32 else model.to(dev, dt)
    kw = dict(dtype=dt, local_files_only=True, use_safetensors=True)
    if name == "digits-features":
        from .features import DigitsClassifier

        return DigitsClassifier.from_pretrained(str(path), **kw).to(dev)
    if name == "digits-vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(path), **kw).to(dev)
    if name == "digits-clip":
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(str(path), dtype=dt, local_files_only=True).to(dev).eval()
    if name == "digits-ddpm":
        from diffusers import DDPMPipeline

        return DDPMPipeline.from_pretrained(str(path), **kw).to(dev)
    if name == "digits-sd":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **kw)
        return pipe.to(dev)
    if name == "digits-dit":
        from diffusers import DiTPipeline

        id2label = {int(k): v for k, v in json.loads((path / "id2label.json").read_text()).items()}
        return DiTPipeline.from_pretrained(str(path), id2label=id2label, **kw).to(dev)
    if name in ("digits-flux", "digits-flux-onestep"):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(path), **kw).to(dev)
        # FluxPipeline's default size is 128 latent pixels (1024 px); the zoo model is trained at 32x32 px
        pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
        return pipe
    if name == "digits-sd-onestep":
        from ..distill.pipeline import RectifiedFlowPipeline

        return RectifiedFlowPipeline.from_pretrained(str(path), **kw).to(dev)
    raise ZooError(f"no loader for zoo model {name!r}")  # pragma: no cover - ENTRIES and loaders kept in sync


def load_processor(name: str = "digits-clip"):
    """The CLIPProcessor saved with a CLIP entry (image preprocessing + tokenizer)."""
    from transformers import CLIPProcessor

    path = _check_entry(name)
    return CLIPProcessor.from_pretrained(str(path), local_files_only=True)


def card(name: str) -> dict:
    """The training card (command, wall time, machine, measured quality) of a trained entry."""
    path = _check_entry(name)
    f = path / "card.json"
    return json.loads(f.read_text()) if f.exists() else {}
