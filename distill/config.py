"""The distillation run's settings: one frozen `DistillConfig`, the command-line flags it is parsed from, and the
checks that need no model.

The flag names follow diffusers' example training scripts (`--output_dir`, `--train_batch_size`,
`--max_train_steps`, `--resume_from_checkpoint latest` ...) plus the stage-specific ones of InstaFlow's recipe
(Liu et al. 2023, arXiv 2309.06380). Every stage reads the same config; `stages.py` says what each stage optimises.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.options import batch_option, float_in, int_in, seed_option, steps_option, threads_option

STAGES = ("pairs", "reflow", "one-step", "guidance")
STAGE_ALIASES = {"generate_pairs": "pairs", "distill": "one-step", "one_step": "one-step"}


class DistillInputError(InputError):
    """Bad input to a stage (exit code 2): named, with nothing overwritten."""


def add_arguments(p: argparse.ArgumentParser, *, with_stage: bool) -> argparse.ArgumentParser:
    """The script's flags on `p`; `with_stage` adds --stage (the module form; `diffaccel distill STAGE` has none)."""
    if with_stage:
        p.add_argument("--stage", required=True, choices=list(STAGES) + list(STAGE_ALIASES),
                       help="pairs: teacher couplings; reflow: train a 2-RF; one-step: distil a k-RF; "
                            "guidance: LoRA guidance distillation")
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_teacher_model", default="digits-sd",
                   help="teacher: a zoo entry (digits-sd, random-sd, digits-flux, random-flux) or a saved pipeline "
                        "folder (StableDiffusionPipeline, RectifiedFlowPipeline or FluxPipeline); default digits-sd")
    g.add_argument("--student_init", default=None,
                   help="pipeline folder or zoo entry the student UNet starts from (reflow/guidance: default the "
                        "teacher; one-step: required, the 2-RF)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (single-process runs; accelerate decides "
                                                   "under accelerate launch)")
    g.add_argument("--threads", type=threads_option, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("pairs")
    g.add_argument("--pairs_dir", default=None, help="pairs folder: written by --stage pairs, read by the others")
    g.add_argument("--num_pairs", type=int_in(1, 10_000_000), default=1024, help="number of couplings (default 1024)")
    g.add_argument("--pair_shard_size", type=int_in(1, 1_000_000), default=256, help="pairs per shard (default 256)")
    g.add_argument("--pair_batch_size", type=batch_option, default=64, help="teacher batch size while making pairs")
    g.add_argument("--pair_dtype", default="fp16", choices=["fp16", "fp32"], help="storage dtype of z0/z1")
    g.add_argument("--prompts_file", default=None,
                   help="one prompt per line (default: the zoo's digit captions, 10 digits x 4 templates)")
    g.add_argument("--teacher_solver", default="ddim", choices=["ddim", "dpmsolver++", "euler"],
                   help="deterministic ODE solver of the teacher (euler for a rectified-flow teacher)")
    g.add_argument("--teacher_steps", type=steps_option, default=25, help="teacher solver steps (default 25)")
    g.add_argument("--teacher_guidance_scale", type=float_in(0.0, 100.0, lo_open=True), default=7.5,
                   help="teacher CFG scale, Imagen form (1.0 = off, must be > 0; default 7.5 as the zoo baseline); "
                        "on a FluxPipeline: true CFG against the empty prompt")
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default=None, help="where checkpoints and the final pipeline go")
    g.add_argument("--seed", type=seed_option, default=0, help="global seed (pairs, batches, times, initialisation)")
    g.add_argument("--train_batch_size", type=batch_option, default=64, help="batch size per process and micro-step")
    g.add_argument("--max_train_steps", type=int_in(1, 100_000_000), default=None,
                   help="optimiser steps (overrides epochs)")
    g.add_argument("--num_train_epochs", type=int_in(1, 1_000_000), default=1,
                   help="epochs over the pairs if no --max_train_steps")
    g.add_argument("--gradient_accumulation_steps", type=int_in(1, 10_000), default=1,
                   help="micro-batches per optimiser step")
    g.add_argument("--gradient_checkpointing", action="store_true", help="UNet gradient checkpointing (less memory)")
    g.add_argument("--learning_rate", type=float_in(0.0, 10.0, lo_open=True), default=1e-4,
                   help="AdamW learning rate (default 1e-4)")
    g.add_argument("--scale_lr", action="store_true", help="lr x accumulation x batch size x processes")
    g.add_argument("--lr_scheduler", default="constant",
                   help="diffusers.optimization.get_scheduler name: constant, constant_with_warmup, cosine, linear ...")
    g.add_argument("--lr_warmup_steps", type=int_in(0, 100_000_000), default=0,
                   help="warm-up optimiser steps of the lr scheduler")
    g.add_argument("--adam_beta1", type=float_in(0.0, 1.0, hi_open=True), default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float_in(0.0, 1.0, hi_open=True), default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float_in(0.0, 10.0), default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float_in(0.0, 1.0, lo_open=True), default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float_in(0.0), default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast for the student; trainable weights stay fp32")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--use_ema", action="store_true", help="keep an EMA of the student; the saved model is the EMA")
    g.add_argument("--ema_decay", type=float_in(0.0, 1.0, hi_open=True), default=0.999,
                   help="EMA decay per optimiser step")
    g.add_argument("--proportion_empty_prompts", type=float_in(0.0, 1.0), default=0.0,
                   help="share of prompts replaced by '' (keeps an unconditional branch for CFG)")
    g.add_argument("--time_sampler", default="uniform", choices=["uniform", "logit-normal"], help="reflow times s")
    g.add_argument("--time_eps", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=1e-3,
                   help="reflow s ~ U(eps, 1)")
    g.add_argument("--loss_type", default="l2", choices=["l2", "features", "features+l2", "huber"],
                   help="one-step loss: latent L2, or squared distance of digits-features embeddings of the decoded "
                        "images (our offline stand-in for LPIPS), their sum, or pseudo-Huber")
    g.add_argument("--huber_c", type=float_in(0.0, lo_open=True), default=1e-3, help="c of the pseudo-Huber loss")
    g.add_argument("--distill_k", type=int_in(1, 1000), default=1, help="steps of the distilled student (1 = one-step)")
    g.add_argument("--lora_rank", type=int_in(1, 4096), default=8, help="guidance stage: LoRA rank")
    g.add_argument("--lora_target_modules", default="to_q,to_k,to_v,to_out.0",
                   help="guidance stage: comma-separated module names that get LoRA adapters")
    g.add_argument("--guidance_scale", type=float_in(0.0, 100.0, lo_open=True), default=None,
                   help="guidance stage: fixed CFG scale w to distil (Imagen form); default: the pairs' teacher scale "
                        "for an ε-model base, 1.5 for a rectified-flow base (InstaFlow)")
    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpointing_steps", type=int_in(1, 100_000_000), default=500,
                   help="save accelerate state to checkpoint-<step> every N optimiser steps")
    g.add_argument("--checkpoints_total_limit", type=int_in(1, 100_000), default=None,
                   help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<step> folder or 'latest'")
    g.add_argument("--validation_steps", type=int_in(0, 100_000_000), default=0,
                   help="validate every N steps (0: only at the end)")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="default: one caption per digit")
    g.add_argument("--report_to", default="none", help="accelerate trackers: none, tensorboard, wandb, all")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--tracker_project_name", default="diffaccel-distill", help="accelerate tracker run name")
    g.add_argument("--log_every", type=int_in(0, 100_000_000), default=25,
                   help="print the loss every N steps on stderr (0: never)")
    return p


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of one stage run (the parsed flags, stage aliases resolved, plus `local_rank` from the
    environment). Frozen: a run never changes its own settings; `dataclasses.replace` makes a variant."""

    stage: str
    pretrained_teacher_model: str
    student_init: str | None
    device: str
    threads: int | None
    pairs_dir: str | None
    num_pairs: int
    pair_shard_size: int
    pair_batch_size: int
    pair_dtype: str
    prompts_file: str | None
    teacher_solver: str
    teacher_steps: int
    teacher_guidance_scale: float
    output_dir: str | None
    seed: int
    train_batch_size: int
    max_train_steps: int | None
    num_train_epochs: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    learning_rate: float
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    mixed_precision: str
    allow_tf32: bool
    use_ema: bool
    ema_decay: float
    proportion_empty_prompts: float
    time_sampler: str
    time_eps: float
    loss_type: str
    huber_c: float
    distill_k: int
    lora_rank: int
    lora_target_modules: str
    guidance_scale: float | None
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    validation_steps: int
    validation_prompts: tuple[str, ...] | None
    report_to: str
    logging_dir: str
    tracker_project_name: str
    log_every: int
    local_rank: int = -1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DistillConfig:
        """From parsed flags (extra attributes, e.g. a sub-command's, are ignored); checks them (`check`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values["stage"] = STAGE_ALIASES.get(values["stage"], values["stage"])
        values["local_rank"] = int(os.environ.get("LOCAL_RANK", -1))
        if values.get("validation_prompts") is not None:
            values["validation_prompts"] = tuple(values["validation_prompts"])
        cfg = cls(**values)
        cfg.check()
        return cfg

    def scalars(self) -> dict[str, Any]:
        """The settings that are numbers, strings, booleans or unset (for model cards and trackers)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if isinstance(v, (int, float, str, bool)) or v is None}

    def check(self) -> None:
        """Sanity checks that need no model (all raise DistillInputError naming the value)."""
        if self.stage == "pairs":
            if not self.pairs_dir:
                raise DistillInputError("--stage pairs needs --pairs_dir (where the shards go)")
            if not self.teacher_guidance_scale > 0:
                raise DistillInputError(f"--teacher_guidance_scale must be > 0 (Imagen form, 1.0 = guidance off), "
                                        f"got {self.teacher_guidance_scale}")
            for name in ("num_pairs", "pair_shard_size", "pair_batch_size", "teacher_steps"):
                if getattr(self, name) < 1:
                    raise DistillInputError(f"--{name} must be >= 1, got {getattr(self, name)}")
            return
        if not self.pairs_dir:
            raise DistillInputError(f"--stage {self.stage} needs --pairs_dir (made by --stage pairs)")
        if not self.output_dir:
            raise DistillInputError(f"--stage {self.stage} needs --output_dir")
        if self.stage == "one-step" and not self.student_init:
            raise DistillInputError("--stage one-step needs --student_init: the reflowed (2-RF) pipeline folder "
                                    "(distilling the ε-teacher directly into one step fails, InstaFlow §3)")
        if self.distill_k < 1:
            raise DistillInputError(f"--distill_k must be >= 1, got {self.distill_k}")
        if self.guidance_scale is not None and not self.guidance_scale > 0:
            raise DistillInputError(f"--guidance_scale must be > 0 (Imagen form, 1.0 = off), got {self.guidance_scale}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise DistillInputError(f"--proportion_empty_prompts must be in [0, 1], got "
                                    f"{self.proportion_empty_prompts}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
            if getattr(self, name) < 1:
                raise DistillInputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise DistillInputError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.loss_type != "l2" and self.stage != "one-step":
            raise DistillInputError(f"--loss_type {self.loss_type} applies to --stage one-step only")

    def prompts(self) -> list[str]:
        """The pair prompts: --prompts_file (one per line) or the zoo's digit captions (10 digits x 4 templates)."""
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise DistillInputError(f"--prompts_file {self.prompts_file} does not exist")
            prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if not prompts:
                raise DistillInputError(f"--prompts_file {self.prompts_file} has no prompts")
            return prompts
        from ..zoo.data import all_captions

        return [c for c, _ in all_captions()]
