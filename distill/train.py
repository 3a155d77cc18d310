"""Reflow, one-step distillation and LoRA guidance distillation, in the shape of diffusers' example training scripts.

(Over 450 lines: still one script as diffusers' examples are; the split into a config object and a stage ->
objective table is not done yet.)

    python -m diffaccel.distill.train --stage pairs    --pretrained_teacher_model digits-sd --pairs_dir pairs/
    python -m diffaccel.distill.train --stage reflow   --pairs_dir pairs/ --output_dir out/2rf
    python -m diffaccel.distill.train --stage pairs    --pretrained_teacher_model out/2rf --teacher_solver euler \
        --teacher_guidance_scale 1.0 --pairs_dir pairs2/
    python -m diffaccel.distill.train --stage one-step --student_init out/2rf --pairs_dir pairs2/ --output_dir out/1step
    accelerate launch -m diffaccel.distill.train --stage reflow ...      # several processes / GPUs

Stages (InstaFlow, Liu et al. 2023, arXiv 2309.06380; Rectified Flow, Liu et al. 2022, arXiv 2209.03003):
`pairs` writes teacher couplings (z0, z1 = ODE_teacher(z0 | c)); `reflow` trains a velocity UNet, initialised from
the teacher, on E‖v(z_s, τ(s), c) − (z1 − z0)‖²; `one-step` distils a k-RF into ẑ1 = z0 + v(z0, τ = 1000, c);
`guidance` trains LoRA adapters so that one conditional pass gives the CFG output.

Training is deterministic given --seed: the batch of optimiser step g and its random times are functions of
(seed, g), so a run resumed from `checkpoint-<g>` (--resume_from_checkpoint latest) continues exactly as an
uninterrupted one (on CPU). Checkpoints are written to `checkpoint-<g>.tmp` and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.files import publish
from ..core.options import batch_option, float_in, int_in, seed_option, steps_option, threads_option

logger = logging.getLogger("diffaccel.distill")

STAGES = ("pairs", "reflow", "one-step", "guidance")
STAGE_ALIASES = {"generate_pairs": "pairs", "distill": "one-step", "one_step": "one-step"}
RUN_FILE = "distill_run.json"


class DistillInputError(InputError):
    """Bad input to a stage (exit code 2): named, with nothing overwritten."""


# ------------------------------------------------------------------------------------------------- arguments


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The script's flags; given `parser` (a `diffaccel distill <stage>` subcommand), adds them there, no --stage."""
    p = parser or argparse.ArgumentParser(prog="python -m diffaccel.distill.train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    if parser is None:
        p.add_argument("--stage", required=True, choices=list(STAGES) + list(STAGE_ALIASES),
                       help="pairs: teacher couplings; reflow: train a 2-RF; one-step: distil a k-RF; "
                            "guidance: LoRA guidance distillation")
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_teacher_model", default="digits-sd",
                   help="teacher: a zoo entry (digits-sd, random-sd) or a saved pipeline folder "
                        "(StableDiffusionPipeline or RectifiedFlowPipeline); default digits-sd")
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
                   help="teacher CFG scale, Imagen form (1.0 = off, must be > 0; default 7.5 as the zoo baseline)")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return normalize_args(args)


def normalize_args(args: argparse.Namespace) -> argparse.Namespace:
    args.stage = STAGE_ALIASES.get(args.stage, args.stage)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    args.local_rank = env_rank
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Sanity checks that need no model (all raise DistillInputError naming the value)."""
    if args.stage == "pairs":
        if not args.pairs_dir:
            raise DistillInputError("--stage pairs needs --pairs_dir (where the shards go)")
        if not args.teacher_guidance_scale > 0:
            raise DistillInputError(f"--teacher_guidance_scale must be > 0 (Imagen form, 1.0 = guidance off), got "
                                    f"{args.teacher_guidance_scale}")
        for name in ("num_pairs", "pair_shard_size", "pair_batch_size", "teacher_steps"):
            if getattr(args, name) < 1:
                raise DistillInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
        return
    if not args.pairs_dir:
        raise DistillInputError(f"--stage {args.stage} needs --pairs_dir (made by --stage pairs)")
    if not args.output_dir:
        raise DistillInputError(f"--stage {args.stage} needs --output_dir")
    if args.stage == "one-step" and not args.student_init:
        raise DistillInputError("--stage one-step needs --student_init: the reflowed (2-RF) pipeline folder "
                                "(distilling the ε-teacher directly into one step fails, InstaFlow §3)")
    if args.distill_k < 1:
        raise DistillInputError(f"--distill_k must be >= 1, got {args.distill_k}")
    if args.guidance_scale is not None and not args.guidance_scale > 0:
        raise DistillInputError(f"--guidance_scale must be > 0 (Imagen form, 1.0 = off), got {args.guidance_scale}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise DistillInputError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise DistillInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise DistillInputError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.loss_type != "l2" and args.stage != "one-step":
        raise DistillInputError(f"--loss_type {args.loss_type} applies to --stage one-step only")


def default_prompts(prompts_file: str | None) -> list[str]:
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise DistillInputError(f"--prompts_file {prompts_file} does not exist")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise DistillInputError(f"--prompts_file {prompts_file} has no prompts")
        return prompts
    from ..zoo.data import all_captions

    return [c for c, _ in all_captions()]


# --------------------------------------------------------------------------------------------------- pairs


def run_pairs(args: argparse.Namespace) -> dict:
    from .pairs import PairWriter
    from .teachers import make_teacher

    solver = args.teacher_solver
    teacher = make_teacher(args.pretrained_teacher_model, solver=solver, steps=args.teacher_steps,
                           device=_device(args))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    writer = PairWriter(args.pairs_dir, teacher, default_prompts(args.prompts_file), num_pairs=args.num_pairs,
                        shard_size=args.pair_shard_size, seed=args.seed, guidance_scale=args.teacher_guidance_scale,
                        batch_size=args.pair_batch_size, storage_dtype=args.pair_dtype)
    t0 = time.time()
    manifest = writer.run(rank=rank, world_size=world)
    info = {"stage": "pairs", "pairs_dir": str(args.pairs_dir), "config_hash": writer.hash,
            "complete": bool(manifest.get("complete")), "num_pairs": args.num_pairs, "seconds": time.time() - t0}
    if rank == 0:  # how the folder was made (all runs, resumed ones included), for model cards
        run_file = Path(args.pairs_dir) / "run.json"
        old = json.loads(run_file.read_text()) if run_file.exists() else {"runs": []}
        old["runs"].append({"command": _command(),
                            "threads": torch.get_num_threads(), "seconds": round(info["seconds"], 1),
                            "machine": f"{platform.machine()}, torch {torch.__version__}"})
        old.update(command=old["runs"][0]["command"], threads=old["runs"][0]["threads"],
                   seconds=round(sum(r["seconds"] for r in old["runs"]), 1))
        run_file.write_text(json.dumps(old, indent=1) + "\n")
    print(json.dumps(info), flush=True)
    return info


def _command() -> str:
    """How this process was started, for model cards (the CLI or the module form)."""
    if Path(sys.argv[0]).name == "diffaccel":
        return "diffaccel " + " ".join(sys.argv[1:])
    return "python -m diffaccel.distill.train " + " ".join(sys.argv[1:])


def _device(args: argparse.Namespace) -> torch.device:
    from ..core import resolve_device

    return resolve_device(args.device)


# ------------------------------------------------------------------------------------------------ training


def micro_batch_indices(n: int, batch: int, world: int, rank: int, micro_step: int, seed: int) -> torch.Tensor:
    """Pair indices of one micro-step: epoch e's permutation comes from (seed, e) alone, so the data order of any
    step is known without dataloader state (exact resume). The last incomplete global batch of an epoch is dropped."""
    global_batch = batch * world
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise DistillInputError(f"{n} pairs are fewer than one global batch ({batch} x {world} processes)")
    epoch, pos = divmod(micro_step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, "epoch", epoch)))
    rows = perm[pos * global_batch:(pos + 1) * global_batch]
    return rows[rank * batch:(rank + 1) * batch]


def _mix(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def _run_config(args: argparse.Namespace, pairs_hash: str) -> dict:
    return {"stage": args.stage, "student_init": str(args.student_init or args.pretrained_teacher_model),
            "pairs_config_hash": pairs_hash, "distill_k": args.distill_k if args.stage == "one-step" else None}


def _checkpoints(out: Path) -> list[Path]:
    found = [d for d in out.glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]))


def check_output_dir(args: argparse.Namespace, run_cfg: dict) -> Path | None:
    """Refuse an output folder from another stage/model/pairs, or with checkpoints but no resume flag; returns the
    checkpoint to resume from (or None). Raises before anything is written."""
    out = Path(args.output_dir)
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
    ckpts = _checkpoints(out) if out.exists() else []
    if args.resume_from_checkpoint is None:
        if ckpts or (out / "model_index.json").exists():
            held = ckpts[-1].name if ckpts else "a final pipeline"
            raise DistillInputError(f"output dir {out} already holds a run ({held}); pass "
                                    "--resume_from_checkpoint latest or use a new --output_dir")
        return None
    if args.resume_from_checkpoint == "latest":
        return ckpts[-1] if ckpts else None
    path = Path(args.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = out / path
    if not path.is_dir():
        raise DistillInputError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
    if path.resolve().parent != out.resolve():
        raise DistillInputError(f"checkpoint {path} is not inside --output_dir {out}")
    return path


def _load_base(args: argparse.Namespace, device: torch.device):
    from .teachers import TeacherError, load_pipeline

    name = args.student_init or args.pretrained_teacher_model
    try:
        return load_pipeline(name, device)
    except TeacherError as exc:
        raise DistillInputError(str(exc)) from exc


def _lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights=True, target_modules=targets)


def run_training(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .objectives import guidance_distill_loss, one_step_distill_loss, rf_loss, rf_time_to_unet_timestep
    from .pairs import PairDataset, PairsError, test_hook
    from .pipeline import RectifiedFlowPipeline

    try:
        data = PairDataset.load(args.pairs_dir)
    except (PairsError, FileNotFoundError) as exc:
        raise DistillInputError(str(exc)) from exc
    run_cfg = _run_config(args, data.config_hash)
    resume_path = check_output_dir(args, run_cfg)

    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / args.logging_dir)),
                              cpu=args.device == "cpu")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.ERROR)
    set_seed(args.seed)
    device = accelerator.device
    base = _load_base(args, device)
    is_rf_base = isinstance(base, RectifiedFlowPipeline)
    if args.stage == "one-step" and not is_rf_base:
        raise DistillInputError(f"--student_init {args.student_init} is a {type(base).__name__}; one-step distillation "
                                "starts from a reflowed RectifiedFlowPipeline (run --stage reflow first)")
    unet = base.unet
    shape = tuple(data.z0.shape[1:])
    want = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if shape != want:
        raise DistillInputError(f"pairs in {args.pairs_dir} have latent shape {shape} but the student UNet "
                                f"expects {want}")
    for m in (base.text_encoder, base.vae):
        m.requires_grad_(False).eval()
    if accelerator.is_main_process:  # every input is checked: only now is anything written
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(run_cfg, indent=1) + "\n")

    if args.stage == "guidance":
        unet.requires_grad_(False)
        unet.add_adapter(_lora_config(args))
        trainable = [p for p in unet.parameters() if p.requires_grad]
    else:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
    unet.train()
    assert all(p.dtype == torch.float32 for p in trainable), "trainable (master) weights must be fp32"
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    ema = None
    if args.use_ema:
        from diffusers import UNet2DConditionModel

        ema = EMAModel(trainable, decay=args.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    n = len(data)
    steps_per_epoch = (n // (args.train_batch_size * accelerator.num_processes)) // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise DistillInputError(f"{n} pairs are fewer than one optimiser step's worth "
                                f"({args.train_batch_size} x {args.gradient_accumulation_steps} x "
                                f"{accelerator.num_processes})")
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)

    # Text embeddings of every prompt (and of ''), once: the text encoder is frozen.
    embed_cache: dict[str, torch.Tensor] = {}

    def embed(prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in embed_cache})
        if missing:
            e = base.encode_prompt(missing, device) if is_rf_base else base.encode_prompt(
                missing, device, 1, False)[0]
            embed_cache.update({p: e[i].float() for i, p in enumerate(missing)})
        return torch.stack([embed_cache[p] for p in prompts])

    decode = features = None
    if args.stage == "one-step" and args.loss_type.startswith("features"):
        from ..zoo import load as zoo_load

        clf = zoo_load("digits-features", device=device).requires_grad_(False).eval()
        sf = base.vae.config.scaling_factor

        def decode(z):
            return base.vae.decode(z / sf).sample

        def features(x):
            if x.shape[1:] != (1, 32, 32):
                raise DistillInputError(f"--loss_type features needs 1x32x32 digit images, the VAE decodes to "
                                        f"{tuple(x.shape[1:])}")
            return clf.features_from_normalized(x.clamp(-1, 1))

    w_guidance = args.guidance_scale
    if args.stage == "guidance" and w_guidance is None:
        w_guidance = 1.5 if is_rf_base else float(data.manifest["config"]["guidance_scale"])
    ddpm_sched = None
    if args.stage == "guidance" and not is_rf_base:
        from diffusers import DDPMScheduler

        ddpm_sched = DDPMScheduler.from_config(base.scheduler.config)

    global_step = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        global_step = int(resume_path.name.split("-")[-1])
        logger.info("resumed from %s (step %d)", resume_path, global_step)

    rank, world, ga = accelerator.process_index, accelerator.num_processes, args.gradient_accumulation_steps
    t_start = time.time()
    last_loss = float("nan")
    loss_log: list[tuple[int, float]] = []
    while global_step < max_steps:
        for a in range(ga):
            micro = global_step * ga + a
            idx = micro_batch_indices(n, args.train_batch_size, world, rank, micro, args.seed)
            gen = torch.Generator().manual_seed(_mix(args.seed, "step", micro, rank))
            prompts = [data.prompts[i] for i in idx.tolist()]
            if args.proportion_empty_prompts > 0:
                drop = torch.rand(len(prompts), generator=gen) < args.proportion_empty_prompts
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
            z0, z1 = data.z0[idx].to(device), data.z1[idx].to(device)
            cond = embed(prompts)
            with accelerator.accumulate(unet), accelerator.autocast():
                if args.stage == "reflow":
                    loss = rf_loss(unet, z0, z1, cond, time_sampler=args.time_sampler, eps=args.time_eps,
                                   generator=gen)
                elif args.stage == "one-step" and args.distill_k == 1:
                    loss = one_step_distill_loss(unet, z0, z1, cond, loss=args.loss_type, decode=decode,
                                                 features=features, huber_c=args.huber_c)
                elif args.stage == "one-step":
                    k = args.distill_k
                    s = torch.randint(0, k, (z0.shape[0],), generator=gen).float() / k
                    loss = rf_loss(unet, z0, z1, cond, s=s)
                else:  # guidance
                    uncond = embed([""] * len(prompts))
                    if is_rf_base:
                        from .objectives import rf_interpolate, sample_time

                        s = sample_time(z0.shape[0], eps=args.time_eps, generator=gen)
                        x_t, t = rf_interpolate(z0, z1, s.to(device)), rf_time_to_unet_timestep(s).to(device)
                    else:
                        t = torch.randint(0, ddpm_sched.config.num_train_timesteps, (z0.shape[0],), generator=gen)
                        noise = torch.randn(z0.shape, generator=gen).to(device)
                        x_t, t = ddpm_sched.add_noise(z1, noise, t.to(device)), t.to(device)
                    loss = guidance_distill_loss(accelerator.unwrap_model(unet), x_t, t, cond, uncond, w_guidance,
                                                 student=unet)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(trainable)
            global_step += 1
            last_loss = float(accelerator.gather(loss.detach().reshape(1)).mean())
            loss_log.append((global_step, last_loss))
            accelerator.log({"train_loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            if args.log_every and (global_step % args.log_every == 0 or global_step == 1):
                logger.info("step %d/%d loss %.5f (%.0f s)", global_step, max_steps, last_loss,
                            time.time() - t_start)
            if global_step % args.checkpointing_steps == 0 and global_step < max_steps:
                save_checkpoint(accelerator, out, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(args, base, accelerator.unwrap_model(unet), ema, trainable, out, global_step, is_rf_base)
            test_hook(f"train:step{global_step}")

    accelerator.wait_for_everyone()
    train_seconds = time.time() - t_start
    info = {"stage": args.stage, "steps": global_step, "final_loss": last_loss, "train_seconds": train_seconds,
            "output_dir": str(out)}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable)
        save_final(args, base, final, out, data, info, loss_log, is_rf_base, w_guidance)
        validate(args, base, final, None, trainable, out, global_step, is_rf_base)
    accelerator.end_training()
    print(json.dumps(info), flush=True)
    return info


def save_checkpoint(accelerator, out: Path, step: int, limit: int | None) -> None:
    """accelerate.save_state into checkpoint-<step>.tmp, then rename: a killed save never looks complete."""
    if accelerator.is_main_process and limit is not None:
        old = _checkpoints(out)
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


def _student_pipeline(args, base, unet, is_rf_base: bool):
    from .pipeline import RectifiedFlowPipeline

    if args.stage == "guidance" and not is_rf_base:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=unet, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    k = args.distill_k if args.stage == "one-step" else None
    return RectifiedFlowPipeline.from_components(base, unet=unet, distilled_steps=k)


@torch.no_grad()
def validate(args, base, unet, ema, trainable, out: Path, step: int, is_rf_base: bool) -> None:
    """Images for fixed prompts and seeds into validation/step-<g>.png (EMA weights swapped in, then restored).

    Uses its own generators, so it never touches the training RNG streams."""
    from ..core import make_generators, pipeline_output_to_uint8
    from ..zoo import caption

    prompts = args.validation_prompts or [caption(i) for i in range(10)]
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    was_training = unet.training
    unet.eval()
    try:
        pipe = _student_pipeline(args, base, unet, is_rf_base)
        pipe.set_progress_bar_config(disable=True)
        steps = args.distill_k if args.stage == "one-step" else 25
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0,
                          generator=make_generators(0, len(prompts)), output_type="np").images
        grid = pipeline_output_to_uint8(images)  # (N, C, H, W)
        row = torch.cat(list(grid), dim=-1)
        from PIL import Image

        arr = row.permute(1, 2, 0).squeeze(-1).numpy()
        (out / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(out / "validation" / f"step-{step:06d}.png")
    finally:
        if was_training:
            unet.train()
        if ema is not None:
            ema.restore(trainable)


def save_final(args, base, unet, out: Path, data, info: dict, loss_log, is_rf_base: bool, w_guidance) -> None:
    """The loadable pipeline (save_pretrained, safetensors) plus distill_card.json and README.md."""
    unet.eval()
    if args.stage == "guidance":
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        (out / "lora").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
                  str(out / "lora" / "adapter_model.safetensors"))
        unet.fuse_lora()
        unet.unload_lora()
    pipe = _student_pipeline(args, base, unet, is_rf_base)
    pipe.save_pretrained(str(out))
    card = {
        "stage": args.stage,
        "command": _command(),
        "student_init": str(args.student_init or args.pretrained_teacher_model),
        "pairs_dir": str(args.pairs_dir), "pairs_config_hash": data.config_hash, "num_pairs": len(data),
        "pairs_teacher": data.manifest["config"]["teacher"],
        "pairs_guidance_scale": data.manifest["config"]["guidance_scale"],
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None},
        "distilled_guidance_scale": w_guidance if args.stage == "guidance" else None,
        "steps": info["steps"], "final_loss": info["final_loss"], "train_seconds": round(info["train_seconds"], 1),
        "machine": f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "loss_curve": [(s, round(v, 6)) for s, v in loss_log[:: max(1, len(loss_log) // 50)]],
    }
    (out / "distill_card.json").write_text(json.dumps(card, indent=1) + "\n")
    use = {"reflow": "RectifiedFlowPipeline, Euler, e.g. 25/4/1 steps",
           "one-step": f"RectifiedFlowPipeline, {args.distill_k} Euler step(s), guidance_scale 1.0",
           "guidance": f"{type(pipe).__name__} at guidance_scale 1.0 (distilled w = {w_guidance})"}[args.stage]
    (out / "README.md").write_text(
        f"# {args.stage} output\n\nMade by `{card['command']}`.\n\n- use: {use}\n"
        f"- started from: `{card['student_init']}`; pairs: {len(data)} (config hash {data.config_hash})\n"
        f"- {info['steps']} optimiser steps, final loss {info['final_loss']:.5f}, {card['train_seconds']} s on "
        f"{card['machine']}\n")


# ---------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace | list[str] | None = None) -> dict:
    """Run one stage; `args` is a parsed namespace, an argv list, or None (sys.argv)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage == "pairs":
        return run_pairs(args)
    return run_training(args)


def cli_entry(argv: list[str] | None = None) -> int:
    """`python -m diffaccel.distill.train`: errors become one line and their exit code (core/errors.py)."""
    from ..core.errors import run_command

    return run_command(lambda: main(argv), debug=bool(os.environ.get("DIFFACCEL_DEBUG")))


if __name__ == "__main__":
    sys.exit(cli_entry())
