"""Exact resume: step-indexed batches, the output folder's run record, and atomic checkpoints.

The batch of micro-step m is a function of (seed, m) alone (an epoch's permutation comes from (seed, epoch)), so a
run restarted from `checkpoint-<g>` needs no dataloader state to continue exactly as an uninterrupted one. A
checkpoint is `accelerate.save_state` into `checkpoint-<g>.tmp`, renamed when complete: a killed save never looks
finished. The output folder records which run it belongs to (`distill_run.json`); another run's folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from ..core.files import publish
from .config import DistillConfig, DistillInputError

logger = logging.getLogger("diffaccel.distill")

RUN_FILE = "distill_run.json"


def micro_batch_indices(n: int, batch: int, world: int, rank: int, micro_step: int, seed: int) -> torch.Tensor:
    """Pair indices of one micro-step: epoch e's permutation comes from (seed, e) alone, so the data order of any
    step is known without dataloader state (exact resume). The last incomplete global batch of an epoch is dropped."""
    global_batch = batch * world
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise DistillInputError(f"{n} pairs are fewer than one global batch ({batch} x {world} processes)")
    epoch, pos = divmod(micro_step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, "epoch", epoch)))
    rows = perm[pos * global_batch:(pos + 1) * global_batch]
    return rows[rank * batch:(rank + 1) * batch]


def mix_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def run_config(cfg: DistillConfig, pairs_hash: str) -> dict:
    return {"stage": cfg.stage, "student_init": str(cfg.student_init or cfg.pretrained_teacher_model),
            "pairs_config_hash": pairs_hash, "distill_k": cfg.distill_k if cfg.stage == "one-step" else None}


def checkpoints(out: Path) -> list[Path]:
    found = [d for d in out.glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]))


def check_output_dir(cfg: DistillConfig, run_cfg: dict) -> Path | None:
    """Refuse an output folder from another stage/model/pairs, or with checkpoints but no resume flag; returns the
    checkpoint to resume from (or None). Raises before anything is written."""
    out = Path(cfg.output_dir)
    run_file = out / RUN_FILE
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diff = {k: (old.get(k), v) for k, v in run_cfg.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise DistillInputError(f"output dir {out} belongs to another run ({what}); nothing was changed — use a "
                                    "new --output_dir")
    elif out.exists() and any(out.iterdir()):
        raise DistillInputError(f"output dir {out} is not empty and holds no {RUN_FILE}; nothing was changed — "
                                "use a new or empty --output_dir")
    ckpts = checkpoints(out) if out.exists() else []
    if cfg.resume_from_checkpoint is None:
        if ckpts or (out / "model_index.json").exists():
            held = ckpts[-1].name if ckpts else "a final pipeline"
            raise DistillInputError(f"output dir {out} already holds a run ({held}); pass "
                                    "--resume_from_checkpoint latest or use a new --output_dir")
        return None
    if cfg.resume_from_checkpoint == "latest":
        return ckpts[-1] if ckpts else None
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = out / path
    if not path.is_dir():
        raise DistillInputError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no such checkpoint folder")
    if path.resolve().parent != out.resolve():
        raise DistillInputError(f"checkpoint {path} is not inside --output_dir {out}")
    return path


def save_checkpoint(accelerator, out: Path, step: int, limit: int | None) -> None:
    """accelerate.save_state into checkpoint-<step>.tmp, then rename: a killed save never looks complete."""
    if accelerator.is_main_process and limit is not None:
        old = checkpoints(out)
        for d in old[:max(0, len(old) - limit + 1)]:
            shutil.rmtree(d)
    tmp = out / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(tmp, out / f"checkpoint-{step}")
        logger.info("saved checkpoint-%d", step)
