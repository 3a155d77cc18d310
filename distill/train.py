"""Reflow, one-step distillation and LoRA guidance distillation, in the shape of diffusers' example training scripts.

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

Settings live in one frozen `config.DistillConfig`; what each stage optimises is the table in `stages.py`; this
module is the loop around them (accelerate, step-indexed batches, checkpoints, validation, the saved model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoints import RUN_FILE, check_output_dir, micro_batch_indices, mix_seed, run_config, save_checkpoint
from .config import STAGE_ALIASES, STAGES, DistillConfig, DistillInputError, add_arguments
from .stages import STAGE_TABLE, MicroBatch, TrainState

logger = logging.getLogger("diffaccel.distill")

__all__ = ["STAGES", "STAGE_ALIASES", "DistillConfig", "DistillInputError", "build_parser", "cli_entry", "main",
           "micro_batch_indices", "normalize_args", "parse_args"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The script's flags; given `parser` (a `diffaccel distill <stage>` subcommand), adds them there, no --stage."""
    p = parser or argparse.ArgumentParser(prog="python -m diffaccel.distill.train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p, with_stage=parser is None)


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    return normalize_args(build_parser().parse_args(argv))


def normalize_args(args: argparse.Namespace) -> DistillConfig:
    """Parsed flags -> the run's frozen, checked config (stage aliases resolved, LOCAL_RANK read)."""
    return DistillConfig.from_args(args)


# --------------------------------------------------------------------------------------------------- pairs


def run_pairs(cfg: DistillConfig) -> dict:
    from .pairs import PairWriter
    from .teachers import make_teacher

    solver = cfg.teacher_solver
    teacher = make_teacher(cfg.pretrained_teacher_model, solver=solver, steps=cfg.teacher_steps,
                           device=_device(cfg))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    writer = PairWriter(cfg.pairs_dir, teacher, cfg.prompts(), num_pairs=cfg.num_pairs,
                        shard_size=cfg.pair_shard_size, seed=cfg.seed, guidance_scale=cfg.teacher_guidance_scale,
                        batch_size=cfg.pair_batch_size, storage_dtype=cfg.pair_dtype)
    t0 = time.time()
    manifest = writer.run(rank=rank, world_size=world)
    info = {"stage": "pairs", "pairs_dir": str(cfg.pairs_dir), "config_hash": writer.hash,
            "complete": bool(manifest.get("complete")), "num_pairs": cfg.num_pairs, "seconds": time.time() - t0}
    if rank == 0:  # how the folder was made (all runs, resumed ones included), for model cards
        run_file = Path(cfg.pairs_dir) / "run.json"
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


def _device(cfg: DistillConfig) -> torch.device:
    from ..core import resolve_device

    return resolve_device(cfg.device)


# ------------------------------------------------------------------------------------------------ training


def _load_base(cfg: DistillConfig, device: torch.device):
    from .teachers import TeacherError, load_pipeline

    name = cfg.student_init or cfg.pretrained_teacher_model
    try:
        return load_pipeline(name, device)
    except TeacherError as exc:
        raise DistillInputError(str(exc)) from exc


def run_training(cfg: DistillConfig) -> dict:
    """One training stage (reflow, one-step or guidance): the loop around `STAGE_TABLE[cfg.stage]`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ..core.families import family_for
    from .pairs import PairDataset, PairsError, test_hook

    stage = STAGE_TABLE[cfg.stage]
    try:
        data = PairDataset.load(cfg.pairs_dir)
    except (PairsError, FileNotFoundError) as exc:
        raise DistillInputError(str(exc)) from exc
    run_cfg = run_config(cfg, data.config_hash)
    resume_path = check_output_dir(cfg, run_cfg)

    out = Path(cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / cfg.logging_dir)),
                              cpu=cfg.device == "cpu")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.ERROR)
    set_seed(cfg.seed)
    device = accelerator.device
    base = _load_base(cfg, device)
    fam = family_for(base)
    check_base(cfg, base, fam)
    is_rf_base = fam.prediction != "eps"
    denoiser = fam.denoiser
    shape = tuple(data.z0.shape[1:])
    want = tuple(fam.latent_shape())
    if shape != want:
        raise DistillInputError(f"pairs in {cfg.pairs_dir} have latent shape {shape} but the student "
                                f"{type(denoiser).__name__} expects {want}")
    for m in base.components.values():  # text encoders, VAE: frozen
        if isinstance(m, torch.nn.Module) and m is not denoiser:
            m.requires_grad_(False).eval()
    if accelerator.is_main_process:  # every input is checked: only now is anything written
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(run_cfg, indent=1) + "\n")

    trainable = stage.trainable(cfg, denoiser)
    model = fam.rf_velocity_model()  # the denoiser itself, or (Flux) a wrapper in rectified-flow convention
    model.train()
    assert all(p.dtype == torch.float32 for p in trainable), "trainable (master) weights must be fp32"
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    ema = None
    if cfg.use_ema:
        ema = EMAModel(trainable, decay=cfg.ema_decay, model_cls=type(denoiser), model_config=denoiser.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    n = len(data)
    steps_per_epoch = (n // (cfg.train_batch_size * accelerator.num_processes)) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise DistillInputError(f"{n} pairs are fewer than one optimiser step's worth "
                                f"({cfg.train_batch_size} x {cfg.gradient_accumulation_steps} x "
                                f"{accelerator.num_processes})")
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if accelerator.is_main_process and cfg.report_to != "none":
        tracked = {k: v for k, v in cfg.scalars().items() if v is not None}
        accelerator.init_trackers(cfg.tracker_project_name, config=tracked)

    # Text conditioning of every prompt (and of ''), once: the text encoders are frozen.
    embed_cache: dict[str, Any] = {}

    def embed(prompts: list[str]) -> Any:
        missing = sorted({p for p in prompts if p not in embed_cache})
        if missing:
            rows = fam.text_rows(missing)
            embed_cache.update({p: _take_row(rows, i) for i, p in enumerate(missing)})
        return _stack_rows([embed_cache[p] for p in prompts])

    state = TrainState(cfg=cfg, model=model, raw_model=accelerator.unwrap_model(model), base=base,
                       is_rf_base=is_rf_base, device=device, embed=embed,
                       pairs_guidance_scale=float(data.manifest["config"]["guidance_scale"]))
    stage.setup(state)

    global_step = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        global_step = int(resume_path.name.split("-")[-1])
        logger.info("resumed from %s (step %d)", resume_path, global_step)

    rank, world, ga = accelerator.process_index, accelerator.num_processes, cfg.gradient_accumulation_steps
    t_start = time.time()
    last_loss = float("nan")
    loss_log: list[tuple[int, float]] = []
    while global_step < max_steps:
        for a in range(ga):
            micro = global_step * ga + a
            idx = micro_batch_indices(n, cfg.train_batch_size, world, rank, micro, cfg.seed)
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, "step", micro, rank))
            prompts = [data.prompts[i] for i in idx.tolist()]
            if cfg.proportion_empty_prompts > 0:
                drop = torch.rand(len(prompts), generator=gen) < cfg.proportion_empty_prompts
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
            batch = MicroBatch(z0=data.z0[idx].to(device), z1=data.z1[idx].to(device), cond=embed(prompts),
                               prompts=prompts, generator=gen)
            with accelerator.accumulate(model), accelerator.autocast():
                loss = stage.loss(state, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
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
            if cfg.log_every and (global_step % cfg.log_every == 0 or global_step == 1):
                logger.info("step %d/%d loss %.5f (%.0f s)", global_step, max_steps, last_loss,
                            time.time() - t_start)
            if global_step % cfg.checkpointing_steps == 0 and global_step < max_steps:
                save_checkpoint(accelerator, out, global_step, cfg.checkpoints_total_limit)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                validate(cfg, base, denoiser, ema, trainable, out, global_step)
            test_hook(f"train:step{global_step}")

    accelerator.wait_for_everyone()
    train_seconds = time.time() - t_start
    info = {"stage": cfg.stage, "steps": global_step, "final_loss": last_loss, "train_seconds": train_seconds,
            "output_dir": str(out)}
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(trainable)
        save_final(cfg, base, denoiser, out, data, info, loss_log, state.guidance_scale)
        validate(cfg, base, denoiser, None, trainable, out, global_step)
    accelerator.end_training()
    print(json.dumps(info), flush=True)
    return info


def check_base(cfg: DistillConfig, base, fam) -> None:
    """What the stage needs of the model it starts from (its family's prediction), before anything is written."""
    if cfg.stage == "one-step" and fam.prediction == "eps":
        raise DistillInputError(f"--student_init {cfg.student_init} is a {type(base).__name__} (an ε-model); one-step "
                                "distillation starts from a velocity model: a reflowed RectifiedFlowPipeline (run "
                                "--stage reflow first) or a flow-matching pipeline")
    if fam.prediction == "flow" and cfg.stage == "guidance":
        raise DistillInputError(f"--stage guidance on a {type(base).__name__} is not supported: its LoRA target is "
                                "a UNet's batched CFG; distil the flow teacher's true CFG through the pairs instead "
                                "(--teacher_guidance_scale)")
    if fam.prediction == "flow" and cfg.stage == "one-step" and cfg.distill_k > 1:
        raise DistillInputError(f"--distill_k {cfg.distill_k} on a {type(base).__name__}: a k-step student is trained "
                                "on the uniform grid {0, 1/k, ...} but the pipeline samples its own shifted σ grid; "
                                "use --distill_k 1")


def _take_row(rows: Any, i: int) -> Any:
    if isinstance(rows, dict):
        return {k: v[i].float() for k, v in rows.items()}
    return rows[i].float()


def _stack_rows(rows: list[Any]) -> Any:
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def _student_pipeline(cfg: DistillConfig, base, denoiser):
    """The pipeline a trained student is saved and sampled as: a flow-matching base keeps its own pipeline class
    (FluxPipeline samples a one-step student with `num_inference_steps=1`); a UNet student becomes a
    RectifiedFlowPipeline, except the guidance stage on an ε-model, which stays a Stable Diffusion pipeline."""
    from ..core.families import family_for
    from .pipeline import RectifiedFlowPipeline

    fam = family_for(base)
    if fam.prediction == "flow":
        return fam.with_denoiser(denoiser)
    if cfg.stage == "guidance" and fam.prediction == "eps":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=denoiser, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    k = cfg.distill_k if cfg.stage == "one-step" else None
    return RectifiedFlowPipeline.from_components(base, unet=denoiser, distilled_steps=k)


@torch.no_grad()
def validate(cfg: DistillConfig, base, unet, ema, trainable, out: Path, step: int) -> None:
    """Images for fixed prompts and seeds into validation/step-<g>.png (EMA weights swapped in, then restored).

    Uses its own generators, so it never touches the training RNG streams."""
    from ..core import make_generators, pipeline_output_to_uint8
    from ..zoo import caption

    prompts = list(cfg.validation_prompts or [caption(i) for i in range(10)])
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    was_training = unet.training
    unet.eval()
    try:
        from ..core.families import family_for

        pipe = _student_pipeline(cfg, base, unet)
        pipe.set_progress_bar_config(disable=True)
        steps = STAGE_TABLE[cfg.stage].sample_steps(cfg)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = pipe(prompts, num_inference_steps=steps, generator=make_generators(0, len(prompts)),
                          output_type="np", **family_for(pipe).unguided_kwargs()).images
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


def save_final(cfg: DistillConfig, base, unet, out: Path, data, info: dict, loss_log,
               w_guidance: float | None) -> None:
    """The loadable pipeline (save_pretrained, safetensors) plus distill_card.json and README.md."""
    unet.eval()
    if cfg.stage == "guidance":
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        (out / "lora").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
                  str(out / "lora" / "adapter_model.safetensors"))
        unet.fuse_lora()
        unet.unload_lora()
    from ..core.families import family_for

    pipe = _student_pipeline(cfg, base, unet)
    pipe.save_pretrained(str(out))
    card = {
        "stage": cfg.stage,
        "family": family_for(pipe).name,
        "distilled_steps": cfg.distill_k if cfg.stage == "one-step" else None,
        "command": _command(),
        "student_init": str(cfg.student_init or cfg.pretrained_teacher_model),
        "pairs_dir": str(cfg.pairs_dir), "pairs_config_hash": data.config_hash, "num_pairs": len(data),
        "pairs_teacher": data.manifest["config"]["teacher"],
        "pairs_guidance_scale": data.manifest["config"]["guidance_scale"],
        "settings": cfg.scalars(),
        "distilled_guidance_scale": w_guidance if cfg.stage == "guidance" else None,
        "steps": info["steps"], "final_loss": info["final_loss"], "train_seconds": round(info["train_seconds"], 1),
        "machine": f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "loss_curve": [(s, round(v, 6)) for s, v in loss_log[:: max(1, len(loss_log) // 50)]],
    }
    (out / "distill_card.json").write_text(json.dumps(card, indent=1) + "\n")
    use = STAGE_TABLE[cfg.stage].usage(cfg, w_guidance, type(pipe).__name__)
    (out / "README.md").write_text(
        f"# {cfg.stage} output\n\nMade by `{card['command']}`.\n\n- use: {use}\n"
        f"- started from: `{card['student_init']}`; pairs: {len(data)} (config hash {data.config_hash})\n"
        f"- {info['steps']} optimiser steps, final loss {info['final_loss']:.5f}, {card['train_seconds']} s on "
        f"{card['machine']}\n")


# ---------------------------------------------------------------------------------------------------- main


def main(cfg: DistillConfig | argparse.Namespace | list[str] | None = None) -> dict:
    """Run one stage; `cfg` is a config, parsed flags, an argv list, or None (sys.argv)."""
    if isinstance(cfg, argparse.Namespace):
        cfg = normalize_args(cfg)
    elif not isinstance(cfg, DistillConfig):
        cfg = parse_args(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.stage == "pairs":
        return run_pairs(cfg)
    return run_training(cfg)


def cli_entry(argv: list[str] | None = None) -> int:
    """`python -m diffaccel.distill.train`: errors become one line and their exit code (core/errors.py)."""
    from ..core.errors import run_command

    def run() -> int:
        main(argv)  # the stage's summary (a dict) is printed as JSON; success is exit code 0
        return 0

    return run_command(run, debug=bool(os.environ.get("DIFFACCEL_DEBUG")))


if __name__ == "__main__":
    sys.exit(cli_entry())
