"""`digits-features`: a small CNN on the zoo's digits, used as the offline feature extractor and classifier.

It follows the torchmetrics ``feature=`` contract (see evals/README.md): uint8 ``(N, C, H, W)`` in, float32
``(N, num_features)`` out; images are converted to one channel, resized with antialiasing to 32x32 when needed,
and the module never leaves eval mode. Features are the LayerNorm-ed penultimate embedding (dense, full-rank
covariance); ``logits`` gives the 10-way classification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..core.errors import InputError


class DigitsClassifier(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 32, widths: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Linear(c3 * (image_size // 8) ** 2, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim
        self.eval()

    # Feature extractors never train in place (torchmetrics does not protect custom modules from `.train()`).
    def train(self, mode: bool = True):
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] (or float [0, 1]) NCHW with 1 or 3 channels -> float (N, 1, 32, 32) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InputError(f"expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 3:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.embed.weight.dtype) * 2 - 1

    def features_from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images already in [-1, 1] at the native size (the training path)."""
        return self.norm(self.embed(self.body(x).flatten(1)))

    def logits_from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.features_from_normalized(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_from_normalized(self.preprocess(images)).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_normalized(self.preprocess(images)).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit for each image."""
        return self.logits(images).argmax(dim=1)
