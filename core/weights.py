"""Weight integrity: recorded SHA-256 digests, component-by-component checks of pipeline folders, finite parameters.

Every failure is a `WeightsError` (exit code 3) that names the missing or broken file and the command that fixes
it (`fix`, given by the caller: retraining a zoo entry, re-saving a pipeline, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import WeightsError
from .files import sha256_file

#: the file beside the weights that records their digests (the zoo's model card)
CARD = "card.json"
WEIGHT_SUFFIXES = (".safetensors",)


def digest_folder(folder: str | Path, exclude: Iterable[str] = (CARD,)) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under `folder` (POSIX separators, sorted), except `exclude`."""
    folder = Path(folder)
    skip = set(exclude)
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.relative_to(folder).as_posix() not in skip
            and not any(part.startswith(".") for part in f.relative_to(folder).parts)}


#: files already hashed in this process, by identity (device, inode, size, mtime): a file that has not changed
#: since it was verified is not read again (repeated loads of one model cost no hashing)
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


def _digest(f: Path) -> str:
    st = f.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(f)
    return _VERIFIED[key]


def verify_digests(folder: str | Path, digests: dict[str, str], *, fix: str, what: str | None = None) -> None:
    """Raise `WeightsError` naming the first file of `digests` that is missing from `folder` or has another
    SHA-256 than recorded (a file unchanged since this process last hashed it is not read again)."""
    folder = Path(folder)
    what = what or str(folder)
    for rel, want in sorted(digests.items()):
        f = folder / rel
        if not f.is_file():
            raise WeightsError(f"{what}: file {rel} is missing; {fix}")
        if _digest(f) != want:
            raise WeightsError(f"{what}: file {rel} is corrupt (its SHA-256 differs from the one recorded in "
                               f"{CARD}); {fix}")


def check_safetensors(path: Path, *, fix: str, what: str) -> None:
    """Refuse a safetensors file whose header cannot be read (truncated or not safetensors at all)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise WeightsError(f"{what}: weight file {path.name} is corrupt or truncated ({exc}); {fix}") from exc


def _component_kind(library: str, class_name: str) -> str:
    """"model" (needs weights), "scheduler", "tokenizer" or "other" for a model_index.json entry."""
    if "Scheduler" in class_name:
        return "scheduler"
    if "Tokenizer" in class_name or "Processor" in class_name or "FeatureExtractor" in class_name:
        return "tokenizer"
    try:
        module = __import__(library)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError):
        return "other"
    from diffusers import ModelMixin

    bases = [ModelMixin]
    try:
        from transformers import PreTrainedModel

        bases.append(PreTrainedModel)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return "model" if isinstance(cls, type) and issubclass(cls, tuple(bases)) else "other"


def check_pipeline_folder(folder: str | Path, *, fix: str) -> list[str]:
    """Check a saved diffusers pipeline folder component by component before loading it.

    model_index.json must exist and parse; every component it lists needs its folder, its config
    (config.json, scheduler_config.json or tokenizer files) and, for networks, a readable .safetensors file.
    Returns the component names; raises `WeightsError` naming the missing or broken piece and `fix`.
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{folder}: model_index.json is missing, so this is not a loadable pipeline folder; {fix}")
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder}: model_index.json is damaged ({exc}); {fix}") from exc
    components = []
    for name, value in config.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library, class_name = value
        components.append(name)
        sub = folder / name
        what = f"{folder}: component {name!r} ({class_name})"
        if not sub.is_dir():
            raise WeightsError(f"{what}: folder {name}/ is missing; {fix}")
        kind = _component_kind(str(library), str(class_name))
        if kind == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                raise WeightsError(f"{what}: {name}/scheduler_config.json is missing; {fix}")
        elif kind == "tokenizer":
            if not any(sub.iterdir()):
                raise WeightsError(f"{what}: {name}/ is empty; {fix}")
        elif kind == "model":
            if not (sub / "config.json").is_file():
                raise WeightsError(f"{what}: {name}/config.json is missing; {fix}")
            weights = sorted(f for f in sub.iterdir() if f.suffix in WEIGHT_SUFFIXES)
            if not weights:
                raise WeightsError(f"{what}: no .safetensors weight file in {name}/; {fix}")
            for f in weights:
                check_safetensors(f, fix=fix, what=what)
    return components


def modules_of(obj) -> list[tuple[str, torch.nn.Module]]:
    """The torch modules of a pipeline (its components) or of a module itself."""
    if isinstance(obj, torch.nn.Module):
        return [("model", obj)]
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        return [(k, v) for k, v in comps.items() if isinstance(v, torch.nn.Module)]
    return []


def check_finite_parameters(obj, *, fix: str, what: str) -> None:
    """Raise `WeightsError` if any parameter or buffer of a pipeline or module is NaN or infinite (damaged
    weights load silently otherwise, and sample black images)."""
    for comp, module in modules_of(obj):
        tensors = [(n, t.detach()) for n, t in [*module.named_parameters(), *module.named_buffers()]
                   if t.is_floating_point() and t.numel()]
        # A sum is finite iff every term is (NaN and inf propagate); it is ~10x cheaper than isfinite on CPU. Only
        # a non-finite sum (a damaged tensor, or finite values that overflow the sum) gets the exact check.
        if not tensors or math.isfinite(float(sum(t.sum(dtype=torch.float32) for _, t in tensors))):
            continue
        bad = next((n for n, t in tensors if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise WeightsError(f"{what}: {comp}.{bad} holds NaN or infinite values after loading (damaged "
                               f"weights); {fix}")
