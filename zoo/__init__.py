"""The model zoo: tiny, genuinely trained diffusers pipelines on scikit-learn's digits, shipped with the package."""

from .data import caption, label_from_prompt, load_split
from .registry import ENTRIES, ZooError, card, entry_path, list_models, load, load_processor

__all__ = [
    "ENTRIES",
    "ZooError",
    "caption",
    "card",
    "entry_path",
    "label_from_prompt",
    "list_models",
    "load",
    "load_processor",
    "load_split",
]
