import warnings

import pytest
import torch
from diffaccel.distill import RectifiedFlowPipeline
from diffaccel.distill.objectives import one_step_distill_loss
from diffaccel.distill.pairs import PairDataset
from diffaccel.distill.train import DistillInputError, main
from safetensors.torch import load_file

VAL = ("--validation_prompts", "a handwritten digit one", "handwritten nine")


def _train_args(stage, pairs, out, *extra):
    return ["--stage", stage, "--pretrained_teacher_model", "random-sd", "--pairs_dir", str(pairs), "--output_dir",
            str(out), "--train_batch_size", "4", "--learning_rate", "1e-3", "--seed", "1", "--log_every", "0", *VAL,
            *extra]


def _unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _snapshot(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def reflow_run(tmp_path_factory, tiny_pairs):
    """6 reflow steps with EMA and checkpoints every 2 (keeping 2), uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("reflow") / "out"
    info = main(_train_args("reflow", tiny_pairs, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                            "--checkpoints_total_limit", "2", "--use_ema", "--ema_decay", "0.9"))
    return out, info


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_pairs, reflow_run, run_train):
    """SIGKILL a real reflow run after step 3 (last checkpoint: step 2), resume with `latest`: the final weights
    (EMA copied in) are bit-identical to the uninterrupted run's."""
    ref_out, ref_info = reflow_run
    assert ref_info["steps"] == 6
    assert sorted(d.name for d in ref_out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    out = tmp_path / "out"
    args = _train_args("reflow", tiny_pairs, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                       "--checkpoints_total_limit", "2", "--use_ema", "--ema_decay", "0.9")
    run_train(*args, hang="train:step3")
    assert (out / "checkpoint-2").is_dir() and not (out / "model_index.json").exists()
    info = main([*args, "--resume_from_checkpoint", "latest"])
    assert info["steps"] == 6 and info["final_loss"] == ref_info["final_loss"]
    got, ref = _unet_weights(out), _unet_weights(ref_out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_outputs_load_as_pipeline_offline(reflow_run, monkeypatch):
    from diffaccel.core import count_nfe, make_generators

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = reflow_run
    pipe = RectifiedFlowPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.distilled_steps is None
    with count_nfe(pipe) as nfe:
        images = pipe(["a handwritten digit one"] * 2, num_inference_steps=3, generator=make_generators(0, 2),
                      output_type="np").images
    assert images.shape == (2, 16, 16, 3) and nfe.calls == 3
    assert (out / "validation").is_dir() and (out / "distill_card.json").exists() and (out / "README.md").exists()


def test_one_step_student_lowers_its_loss_and_loads(tmp_path, tiny_pairs, reflow_run):
    from diffaccel.core import count_nfe, make_generators

    rf_out, _ = reflow_run
    out = tmp_path / "onestep"
    main(["--stage", "one-step", "--student_init", str(rf_out), "--pairs_dir", str(tiny_pairs), "--output_dir",
          str(out), "--train_batch_size", "8", "--learning_rate", "2e-3", "--max_train_steps", "8", "--log_every",
          "0", *VAL])
    data = PairDataset.load(tiny_pairs)

    def loss_of(folder):
        pipe = RectifiedFlowPipeline.from_pretrained(str(folder), local_files_only=True)
        with torch.no_grad():
            return float(one_step_distill_loss(pipe.unet, data.z0, data.z1, pipe.encode_prompt(data.prompts)))

    assert loss_of(out) < 0.9 * loss_of(rf_out)
    pipe = RectifiedFlowPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.distilled_steps == 1
    with count_nfe(pipe) as nfe:
        pipe(["handwritten nine"], generator=make_generators(0, 1), output_type="np")
    assert nfe.calls == 1
    with pytest.warns(UserWarning, match="distilled for 1 step"):
        pipe(["handwritten nine"], num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="guidance_scale must be > 0"):
        pipe(["handwritten nine"], guidance_scale=0.0)


def test_guidance_stage_saves_fused_pipeline_and_adapter(tmp_path, tiny_pairs):
    from diffaccel import zoo
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "guid"
    main(_train_args("guidance", tiny_pairs, out, "--max_train_steps", "3", "--lora_rank", "4",
                     "--guidance_scale", "3.0"))
    adapter = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert adapter and all("lora" in k for k in adapter)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    fused, base = pipe.unet.state_dict(), zoo.load("random-sd").unet.state_dict()
    assert fused.keys() == base.keys()  # LoRA merged into the weights, no adapter modules left
    assert any(not torch.equal(fused[k], base[k]) for k in base)


def test_bad_input_clear_errors_nothing_overwritten(tmp_path, tiny_pairs, reflow_run, capsys):
    from diffaccel.cli import main as cli_main

    ref_out, _ = reflow_run
    before = _snapshot(ref_out)
    # a resume folder from another stage, or from another model
    with pytest.raises(DistillInputError, match="another run.*stage: folder has 'reflow', this run 'one-step'"):
        main(["--stage", "one-step", "--student_init", str(ref_out), "--pairs_dir", str(tiny_pairs),
              "--output_dir", str(ref_out), "--resume_from_checkpoint", "latest"])
    with pytest.raises(DistillInputError, match="another run.*student_init: folder has 'random-sd'"):
        main(_train_args("reflow", tiny_pairs, ref_out, "--student_init", str(ref_out), "--resume_from_checkpoint",
                         "latest"))
    with pytest.raises(DistillInputError, match="already holds a run"):
        main(_train_args("reflow", tiny_pairs, ref_out, "--max_train_steps", "2"))
    assert _snapshot(ref_out) == before
    # missing teacher: named, and the output folder is not even created
    out = tmp_path / "never"
    with pytest.raises(DistillInputError, match="teacher '/no/such/teacher' not found"):
        main(_train_args("reflow", tiny_pairs, out, "--pretrained_teacher_model", "/no/such/teacher"))
    assert not out.exists()
    with pytest.raises(DistillInputError, match="needs --student_init"):
        main(["--stage", "one-step", "--pairs_dir", str(tiny_pairs), "--output_dir", str(out)])
    # guidance <= 0 with CFG on
    # (the option's type rejects it while parsing: exit 2, naming the option)
    with pytest.raises(SystemExit) as exc:
        main(["--stage", "pairs", "--pairs_dir", str(out), "--teacher_guidance_scale", "0"])
    assert exc.value.code == 2
    assert "--teacher_guidance_scale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(_train_args("guidance", tiny_pairs, out, "--guidance_scale", "-2"))
    assert exc.value.code == 2
    assert "--guidance_scale" in capsys.readouterr().err
    assert not out.exists()
    # through the CLI: exit code 2 and a one-line error
    assert cli_main(["distill", "pairs", "--pretrained_teacher_model", "no-such-model", "--pairs_dir",
                     str(out)]) == 2
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["distill", "reflow", "--pairs_dir", str(tmp_path / "nopairs"), "--output_dir",
                         str(out)]) == 2


def test_step_indexed_batches_partition_each_epoch_across_ranks():
    from diffaccel.distill.train import micro_batch_indices

    n, b, world = 26, 3, 2  # 4 global batches of 6 per epoch, 2 rows dropped
    seen = [micro_batch_indices(n, b, world, r, m, seed=0).tolist() for m in range(4) for r in range(world)]
    flat = [i for rows in seen for i in rows]
    assert len(flat) == 24 == len(set(flat))  # every pair at most once per epoch, ranks disjoint
    assert micro_batch_indices(n, b, world, 1, 2, seed=0).tolist() == seen[2 * 2 + 1]  # a function of (seed, step)
    assert micro_batch_indices(n, b, world, 0, 4, seed=0).tolist() != seen[0]  # next epoch: a new permutation
    with pytest.raises(DistillInputError, match="fewer than one global batch"):
        micro_batch_indices(5, 3, 2, 0, 0, seed=0)
