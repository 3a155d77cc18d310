"""Rewards (verifiers) for steering and search: images or latents + prompts -> float32 ``[N]``, higher is better.

Protocol: a reward has a `name`, an `input_kind` (``"tensor01"``: float NCHW images in [0, 1]
exactly as the pipeline would return them, or ``"latent"``: the raw latents) and is called as
``reward(images, prompts)``. It runs under ``torch.no_grad()``, returns one value per item and batch results equal
per-item results. `check_rewards` enforces the output contract and names the offending reward.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from ...core import tensor_to_pil, to_uint8
from ...core.errors import InputError

InputKind = Literal["tensor01", "latent"]


@runtime_checkable
class Reward(Protocol):
    name: str
    input_kind: InputKind

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class RewardError(InputError):
    """A reward broke the protocol (wrong shape, wrong type, NaN)."""


def check_rewards(values, n: int, name: str, allow_nonfinite: bool = False) -> torch.Tensor:
    """Validate a reward's output: a float tensor of shape ``[n]`` without NaN (unless `allow_nonfinite`)."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; expected a float tensor of shape [{n}]")
    if values.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)}; expected [{n}] (one value per image)")
    if not torch.is_floating_point(values):
        raise RewardError(f"reward {name!r} returned dtype {values.dtype}; expected a floating-point tensor")
    values = values.detach().float().cpu()
    if not allow_nonfinite and torch.isnan(values).any():
        bad = torch.nonzero(torch.isnan(values)).flatten().tolist()
        raise RewardError(f"reward {name!r} returned NaN for item(s) {bad}")
    return values


class BaseReward:
    """Shared machinery: no-grad, optional micro-batching (`batch_size`), output validation."""

    name: str = "reward"
    input_kind: InputKind = "tensor01"
    higher_is_better: bool = True

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        n = len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        if len(prompts) != n:
            raise InputError(f"reward {self.name!r}: {n} images but {len(prompts)} prompts")
        step = self.batch_size or max(n, 1)
        parts = [self.score(images[i:i + step], list(prompts[i:i + step])) for i in range(0, n, step)]
        out = torch.cat([torch.as_tensor(p, dtype=torch.float32).reshape(-1).cpu() for p in parts]) if parts else \
            torch.zeros(0)
        return check_rewards(out, n, self.name, allow_nonfinite=True)


class ClassifierReward(BaseReward):
    """``log p(y | x)`` of the digit the prompt names, under the zoo's `digits-features` classifier."""

    name = "classifier"

    def __init__(self, classifier: torch.nn.Module | None = None, label_fn: Callable[[str], int | None] | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        if classifier is None:
            from ...zoo import load

            classifier = load("digits-features")
        if label_fn is None:
            from ...zoo import label_from_prompt as label_fn
        self.classifier = classifier.eval()
        self.label_fn = label_fn

    def labels(self, prompts: Sequence[str]) -> torch.Tensor:
        labels = [self.label_fn(p) for p in prompts]
        missing = [p for p, y in zip(prompts, labels, strict=True) if y is None]
        if missing:
            raise InputError(f"reward {self.name!r}: no single digit named in prompt(s) {missing[:3]}")
        return torch.tensor(labels, dtype=torch.long)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        logits = self.classifier.logits(to_uint8(images.float().cpu()).to(device)).float().cpu()
        return torch.log_softmax(logits, dim=1).gather(1, self.labels(prompts)[:, None])[:, 0]


class CLIPReward(BaseReward):
    """Raw cosine similarity of CLIP image and text embeddings (not ×100, not clipped; as the FK reference)."""

    name = "clip"

    def __init__(self, model: str | Path | None = None, batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        from transformers import CLIPModel, CLIPProcessor

        if model is None:
            from ...zoo import load, load_processor

            self.model, self.processor = load("digits-clip"), load_processor("digits-clip")
        else:
            self.model = CLIPModel.from_pretrained(str(model), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(model), local_files_only=True)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pil = [im.convert("RGB") for im in tensor_to_pil(images.float().cpu(), value_range=(0.0, 1.0))]
        inputs = self.processor(text=list(prompts), images=pil, return_tensors="pt", padding=True)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (getattr(e, "pooler_output", e) for e in (img, txt))
        return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu()


class CompressibilityReward(BaseReward):
    """Negative JPEG size in kB at quality 95: the compressibility reward of DDPO (Black et al. 2024, §6.1)."""

    name = "compressibility"

    def __init__(self, quality: int = 95, batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        sizes = []
        for im in tensor_to_pil(images.float().cpu(), value_range=(0.0, 1.0)):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=self.quality)
            sizes.append(-buf.tell() / 1000.0)
        return torch.tensor(sizes, dtype=torch.float32)


class CallableReward(BaseReward):
    """Any ``fn(images, prompts) -> [N]`` (tensor, array or list) as a reward; `input_kind` says what it receives."""

    def __init__(self, fn: Callable, name: str | None = None, input_kind: InputKind = "tensor01",
                 batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.input_kind = input_kind

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.fn(images, prompts)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.shape != (len(images),):
            raise RewardError(f"reward {self.name!r} returned shape {tuple(out.shape)}; expected [{len(images)}]")
        return out.float()


class ConstantReward(BaseReward):
    """``r ≡ c``: FK with it must reduce to independent sampling."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__(None)
        self.value = float(value)
        self.name = f"constant({value:g})"
        self.input_kind = "latent"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.full((len(images),), self.value)


def as_reward(reward) -> Reward:
    """A `Reward` as is; a plain callable wrapped as a `CallableReward` on [0, 1] images."""
    if isinstance(reward, Reward):
        if reward.input_kind not in ("tensor01", "latent"):
            raise InputError(f"reward {reward.name!r}: input_kind must be 'tensor01' or 'latent'")
        return reward
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(f"expected a Reward or a callable, got {type(reward).__name__}")


def score(reward: Reward, images: torch.Tensor, prompts: Sequence[str], allow_nonfinite: bool = False) -> torch.Tensor:
    """Call `reward` and validate its output (shape ``[N]``, float, no NaN unless allowed), naming it on error."""
    return check_rewards(reward(images, prompts), len(images), getattr(reward, "name", "reward"), allow_nonfinite)
