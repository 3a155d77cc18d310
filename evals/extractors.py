"""Feature extractors behind one interface, each usable as torchmetrics' ``feature=`` module.

An extractor takes uint8 ``(N, 1|3, H, W)`` images, converts them to its channel count, resizes them to its native
size by a named resize mode (`evals.images`), and returns float32 ``(N, num_features)``. It never leaves eval mode
(evals/README.md). Registered names:

- ``digits``: the zoo's `digits-features` classifier (d = 128, 32x32 grey; offline default). Numbers made with it
  are "FID (domain: digits-features)", comparable only with each other.
- ``inception``: the TF FID Inception-v3 (pool3, d = 2048, 299x299) from a local weight file (`evals.inception`).
- ``clip`` / ``clip:<folder>``: image embeddings of a local CLIP model folder (default the zoo's `digits-clip`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .errors import EvalInputError, FeatureExtractorWeightsNotFound
from .images import check_resize_mode, prepare_images

EXTRACTORS = ("digits", "inception", "clip")
DIGITS_NAME = "domain:digits-features"
INCEPTION_NAME = "inception-tf-2015-12-05:pool3"


def _folder_sha256(folder: Path) -> str:
    """SHA-256 over the sorted weight files of a folder (name + bytes)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")) or sorted(folder.rglob("*.bin")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Base class: subclasses set `name`, `num_features`, `native_size`, `channels`, `sha256` and implement
    `embed(x)` on prepared float input (N, channels, native_size, native_size) in [0, 255]."""

    name: str = ""
    num_features: int = 0
    native_size: int = 0
    channels: int = 3
    sha256: str = ""
    has_logits: bool = False

    def __init__(self, resize: str = "clean"):
        super().__init__()
        self.resize = check_resize_mode(resize)

    def train(self, mode: bool = True):
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.native_size, self.channels, self.resize).to(self.device)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"extractor {self.name} has no classifier logits")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(images)).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_with_logits(self.prepare(images))[1].float()

    def describe(self) -> dict:
        """What every result records about the features (evals/README.md, "Python API")."""
        return {"extractor": self.name, "extractor_sha256": self.sha256, "dims": self.num_features,
                "resize": self.resize}


class DigitsExtractor(FeatureExtractor):
    """The zoo's `digits-features` CNN: LayerNorm-ed penultimate embedding (d = 128) and 10-way logits."""

    native_size = 32
    channels = 1
    has_logits = True

    def __init__(self, resize: str = "clean", model: nn.Module | None = None):
        super().__init__(resize)
        from ..zoo import entry_path, load

        self.model = model if model is not None else load("digits-features")
        self.model.requires_grad_(False)
        self.num_features = int(self.model.num_features)
        self.native_size = int(self.model.config.image_size)
        self.name = DIGITS_NAME
        self.sha256 = _folder_sha256(entry_path("digits-features")) if model is None else ""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0).to(self.model.embed.weight.dtype) * 2 - 1  # same arithmetic as the classifier's own path

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features_from_normalized(self._normalize(x))

    def embed_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.features_from_normalized(self._normalize(x))
        return f, self.model.head(torch.nn.functional.gelu(f))


class InceptionExtractor(FeatureExtractor):
    """TF FID Inception-v3, pool3 (d = 2048) and 1008 logits without bias. Normalises uint8 as (x - 128) / 128
    (TF-exact); the ``legacy-pytorch`` resize mode uses pytorch-fid's 2 * x / 255 - 1 instead."""

    native_size = 299
    channels = 3
    has_logits = True

    def __init__(self, resize: str = "clean", weights: str | Path | None = None, model: nn.Module | None = None,
                 check_digest: bool = True):
        super().__init__(resize)
        from .inception import FEATURE_DIMS, load_fid_inception

        if model is None:
            model, self.sha256 = load_fid_inception(weights, check_digest=check_digest)
        self.model = model.requires_grad_(False)
        self.num_features = FEATURE_DIMS
        self.name = INCEPTION_NAME

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / 127.5 - 1.0 if self.resize == "legacy-pytorch" else (x - 128.0) / 128.0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pool3(self._normalize(x))

    def embed_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(self._normalize(x))


def resolve_clip_folder(model: str | Path = "digits-clip") -> Path:
    """A zoo CLIP entry name or a local folder -> the folder; missing -> `FeatureExtractorWeightsNotFound`."""
    from ..zoo import ENTRIES, entry_path

    folder = entry_path(str(model)) if str(model) in ENTRIES else Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise FeatureExtractorWeightsNotFound(
            f"clip: no CLIP model folder at {folder} (expected config.json and weights there); pass a local "
            f"transformers CLIP folder with --clip-model <folder>, or train the zoo one with "
            f"`diffaccel zoo train digits-clip`. No download was attempted (offline mode).")
    return folder


def load_clip(model: str | Path = "digits-clip"):
    """(CLIPModel, CLIPProcessor) from a local folder, never touching the network."""
    from transformers import CLIPModel, CLIPProcessor

    folder = resolve_clip_folder(model)
    try:
        clip = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except OSError as exc:
        raise FeatureExtractorWeightsNotFound(f"clip: cannot load the CLIP model/processor in {folder} ({exc}). "
                                              "No download was attempted (offline mode).") from exc
    return clip, processor


class ClipExtractor(FeatureExtractor):
    """Projected image embeddings of a local CLIP model (d = projection_dim). Images are resized by the resize mode
    straight to the vision tower's size (square, no crop) and normalised with the processor's mean and std."""

    channels = 3

    def __init__(self, resize: str = "clean", model: str | Path = "digits-clip"):
        super().__init__(resize)
        folder = resolve_clip_folder(model)
        self.model, processor = load_clip(folder)
        self.model.requires_grad_(False)
        ip = processor.image_processor
        self.register_buffer("mean", torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.native_size = int(self.model.config.vision_config.image_size)
        self.num_features = int(self.model.config.projection_dim)
        self.name = f"clip:{folder.name}"
        self.sha256 = _folder_sha256(folder)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x / 255.0 - self.mean) / self.std
        out = self.model.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output, older a tensor


def load_extractor(name: str = "digits", *, resize: str = "clean", device: str | torch.device = "cpu",
                   inception_weights: str | Path | None = None, clip_model: str | Path = "digits-clip"
                   ) -> FeatureExtractor:
    """An extractor by registered name (`EXTRACTORS`; ``clip:<folder>`` picks a CLIP folder), on `device`."""
    if name == "digits":
        ext: FeatureExtractor = DigitsExtractor(resize)
    elif name == "inception":
        ext = InceptionExtractor(resize, weights=inception_weights)
    elif name == "clip" or name.startswith("clip:"):
        ext = ClipExtractor(resize, model=name.split(":", 1)[1] if ":" in name else clip_model)
    else:
        raise EvalInputError(f"unknown extractor {name!r}; expected one of {', '.join(EXTRACTORS)} or clip:<folder>")
    return ext.to(device)


def extractor_name(name: str, clip_model: str | Path = "digits-clip") -> str:
    """The name an extractor records in its statistics, from a short name (digits, inception, clip, clip:<folder>)
    or a recorded name itself; nothing is loaded."""
    if name == "digits":
        return DIGITS_NAME
    if name == "inception":
        return INCEPTION_NAME
    if name == "clip" or (name.startswith("clip:") and "/" in name):
        return f"clip:{Path(name.split(':', 1)[1] if ':' in name else clip_model).name}"
    if name in (DIGITS_NAME, INCEPTION_NAME) or name.startswith("clip:"):
        return name
    raise EvalInputError(f"--assume-extractor {name!r} is not an extractor; expected digits, inception, clip, "
                         "clip:<folder> or a recorded name such as " + INCEPTION_NAME)
