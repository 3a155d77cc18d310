"""Distillation from a flow-matching teacher (`random-flux`, tiny): pairs are the stock FluxPipeline's ODE endpoints,
the student is the teacher's transformer read in rectified-flow convention, a killed run resumes exactly, and the
one-step student runs through the protocol (`OneStep`)."""

import pytest
import torch
from diffaccel import zoo
from diffaccel.core.families import family_for
from diffaccel.core.families.flux import FluxRFVelocity, pack_latents, unpack_latents
from diffaccel.distill.objectives import one_step_prediction, rf_time_to_unet_timestep
from diffaccel.distill.pairs import PairDataset, pair_seed
from diffaccel.distill.teachers import load_pipeline
from diffaccel.distill.train import DistillInputError, main
from safetensors.torch import load_file

STEPS, W = 3, 2.0  # teacher: 3 flow-matching Euler steps, true CFG 2 against the empty prompt
FLUX_PAIRS = ("--stage", "pairs", "--pretrained_teacher_model", "random-flux", "--teacher_steps", str(STEPS),
              "--teacher_guidance_scale", str(W), "--num_pairs", "16", "--pair_shard_size", "8",
              "--pair_batch_size", "4", "--pair_dtype", "fp32", "--seed", "5")
VAL = ("--validation_prompts", "a handwritten digit one")


def _train_args(stage, pairs, out, *extra):
    return ["--stage", stage, "--pretrained_teacher_model", "random-flux", "--pairs_dir", str(pairs), "--output_dir",
            str(out), "--train_batch_size", "4", "--learning_rate", "1e-3", "--seed", "1", "--log_every", "0", *VAL,
            *extra]


REFLOW = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--use_ema",
          "--ema_decay", "0.9")


@pytest.fixture(scope="module")
def flux_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxpairs") / "pairs"
    main([*FLUX_PAIRS, "--pairs_dir", str(root)])
    return root


@pytest.fixture(scope="module")
def flux_reflow(tmp_path_factory, flux_pairs):
    out = tmp_path_factory.mktemp("fluxreflow") / "out"
    info = main(_train_args("reflow", flux_pairs, out, *REFLOW))
    return out, info


@pytest.fixture(scope="module")
def flux_onestep(tmp_path_factory, flux_pairs, flux_reflow):
    out = tmp_path_factory.mktemp("fluxonestep") / "out"
    main(["--stage", "one-step", "--student_init", str(flux_reflow[0]), "--pairs_dir", str(flux_pairs),
          "--output_dir", str(out), "--train_batch_size", "8", "--learning_rate", "2e-3", "--max_train_steps", "8",
          "--log_every", "0", *VAL])
    return out


def _stock():
    pipe = zoo.load("random-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_pairs_are_the_stock_pipelines_ode_endpoints(flux_pairs):
    """Pair i = (the noise FluxPipeline draws from generator seed_i, what the stock pipeline returns from it with
    true CFG), whatever the teacher's batch; and the guidance is really applied (without it z1 differs)."""
    data = PairDataset.load(flux_pairs)
    assert tuple(data.z0.shape[1:]) == (4, 8, 8)  # random-flux: 16 px, VAE factor 2, 4 latent channels
    pipe = _stock()
    h = w = 16  # the VAE's sample_size: the teacher's native resolution
    for i in (0, 5, 11):
        gen = torch.Generator().manual_seed(pair_seed(5, i))
        assert int(data.seeds[i]) == pair_seed(5, i)
        kw = dict(height=h, width=w, num_inference_steps=STEPS, output_type="latent", max_sequence_length=16)
        noise, _ = pipe.prepare_latents(1, 4, h, w, torch.float32, "cpu", torch.Generator().manual_seed(
            pair_seed(5, i)))
        assert torch.equal(pack_latents(data.z0[i:i + 1]), noise)  # the same draw, bit for bit
        z1 = pipe(data.prompts[i], generator=gen, true_cfg_scale=W, negative_prompt="", **kw).images
        z1 = unpack_latents(z1, 8, 8)[0]
        # fp32 storage; the teacher ran 4 pairs per batch, the stock call 1: only the summation blocking of the
        # matmuls differs, a few ulp (1.2e-7 each) of O(1) latents per op over 3 steps x 2 calls of a 2-block
        # transformer (measured: 9.5e-7 at most); 1e-5 leaves a 10x margin and is 100x below the CFG effect
        torch.testing.assert_close(data.z1[i], z1, rtol=1e-5, atol=1e-5)
        unguided = unpack_latents(pipe(data.prompts[i], generator=torch.Generator().manual_seed(pair_seed(5, i)),
                                       **kw).images, 8, 8)[0]
        assert (unguided - data.z1[i]).abs().max() > 1e-3


def test_flux_transformer_is_a_rectified_flow_velocity():
    """The student wrapper is −T(pack(z), σ = τ/1000) unpacked, and one Euler step of the RF objective's prediction
    z0 + m(z0, τ = 1000) is exactly FluxPipeline's own one-step sample."""
    pipe = load_pipeline("random-flux")  # at the VAE's 16 px (the loader's native size)
    pipe.set_progress_bar_config(disable=True)
    fam = family_for(pipe)
    model = fam.rf_velocity_model()
    assert isinstance(model, FluxRFVelocity) and model.transformer is pipe.transformer
    assert list(dict(model.named_parameters())) == [f"transformer.{k}" for k, _ in pipe.transformer.named_parameters()]
    prompts = ["a handwritten digit one", "handwritten seven"]
    cond = fam.text_rows(prompts)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = one_step_prediction(model, z0, cond)
        ref = pipe(prompts, latents=pack_latents(z0), num_inference_steps=1, output_type="latent",
                   max_sequence_length=16).images
        assert torch.equal(one, unpack_latents(ref, 8, 8))  # same ops: x + (0 − 1)·T(x, σ = 1)
        s = torch.tensor([0.25, 0.7])
        v = model(z0, rf_time_to_unet_timestep(s), encoder_hidden_states=cond)
        g = torch.full((2,), 3.5)  # random-flux has the embedded guidance input, at the pipeline default
        ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        t = pipe.transformer(hidden_states=pack_latents(z0), timestep=1 - s, guidance=g,
                             pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                             txt_ids=torch.zeros(cond["embeds"].shape[1], 3), img_ids=ids, return_dict=False)[0]
        # τ/1000 = (1000·(1 − s))/1000 vs 1 − s: equal up to one rounding of the time input (fp32)
        torch.testing.assert_close(v, -unpack_latents(t, 8, 8), rtol=1e-5, atol=1e-5)


def test_flux_killed_reflow_resumes_to_the_same_weights(tmp_path, flux_pairs, flux_reflow, run_train):
    """SIGKILL a flux reflow run after step 3 (last checkpoint: step 2), resume with `latest`: final weights (EMA
    copied in) bit-identical to the uninterrupted run's; the saved student is a FluxPipeline at the native size."""
    ref_out, ref_info = flux_reflow
    out = tmp_path / "out"
    args = _train_args("reflow", flux_pairs, out, *REFLOW)
    run_train(*args, hang="train:step3")
    assert (out / "checkpoint-2").is_dir() and not (out / "model_index.json").exists()
    info = main([*args, "--resume_from_checkpoint", "latest"])
    assert info["steps"] == 6 and info["final_loss"] == ref_info["final_loss"]
    f = "transformer/diffusion_pytorch_model.safetensors"
    got, ref = load_file(str(out / f)), load_file(str(ref_out / f))
    teacher = zoo.load("random-flux").transformer.state_dict()
    assert got.keys() == ref.keys() == teacher.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert any(not torch.equal(ref[k], teacher[k]) for k in ref)  # trained, starting from the teacher itself
    pipe = load_pipeline(str(ref_out))
    assert type(pipe).__name__ == "FluxPipeline" and pipe.default_sample_size * pipe.vae_scale_factor == 16


def test_flux_one_step_student_lowers_its_loss_and_runs_through_the_protocol(flux_pairs, flux_reflow, flux_onestep):
    from diffaccel import OneStep, accelerate
    from diffaccel.core import count_nfe, make_generators

    data = PairDataset.load(flux_pairs)

    def loss_of(folder):
        fam = family_for(load_pipeline(str(folder)))
        with torch.no_grad():
            pred = one_step_prediction(fam.rf_velocity_model(), data.z0, fam.text_rows(data.prompts))
        return float(torch.nn.functional.mse_loss(pred, data.z1))

    assert loss_of(flux_onestep) < 0.9 * loss_of(flux_reflow[0])
    student = load_pipeline(str(flux_onestep))
    student.set_progress_bar_config(disable=True)
    prompts = ["a handwritten digit one", "handwritten nine"]
    kw = dict(max_sequence_length=16, output_type="np")
    own = student(prompts, num_inference_steps=1, generator=make_generators(0, 2), **kw).images

    teacher = load_pipeline(str(flux_reflow[0]))  # shares the student's text encoders and VAE
    teacher.set_progress_bar_config(disable=True)
    before = teacher(prompts, num_inference_steps=2, generator=make_generators(0, 2), **kw).images
    with accelerate(teacher, OneStep(str(flux_onestep))) as handle:
        with count_nfe(teacher) as nfe:
            got = handle(prompts, generator=make_generators(0, 2), **kw).images
        assert nfe.calls == 1
        # true CFG: the unconditional call returns the step's conditional output, so guidance changes nothing
        cfg = handle(prompts, generator=make_generators(0, 2), true_cfg_scale=4.0, negative_prompt="", **kw).images
    assert (got == own).all() and (cfg == own).all()
    after = teacher(prompts, num_inference_steps=2, generator=make_generators(0, 2), **kw).images
    assert (after == before).all()
    card = (flux_onestep / "distill_card.json").read_text()
    assert '"family": "flux"' in card and '"distilled_steps": 1' in card


def test_flux_bad_stages_and_students_refused(tmp_path, flux_pairs, flux_reflow):
    from diffaccel import CompositionError, OneStep, accelerate

    with pytest.raises(CompositionError, match="the student is a RectifiedFlowPipeline; a FluxPipeline takes a "
                                               "FluxPipeline student"):
        accelerate(_stock(), OneStep("digits-sd-onestep"))
    out = tmp_path / "never"
    with pytest.raises(DistillInputError, match="--stage guidance on a FluxPipeline is not supported"):
        main(_train_args("guidance", flux_pairs, out, "--max_train_steps", "1"))
    with pytest.raises(DistillInputError, match="--distill_k 2 on a FluxPipeline"):
        main(["--stage", "one-step", "--student_init", str(flux_reflow[0]), "--pairs_dir", str(flux_pairs),
              "--output_dir", str(out), "--distill_k", "2"])
    assert not out.exists()


def test_module_entry_exits_zero_after_a_stage(flux_pairs, run_train):
    """`python -m diffaccel.distill.train` ends a finished stage with exit code 0 and its JSON summary on stdout (it
    used to turn the summary dict into an exit code and fail with an internal error after the work was done)."""
    import json

    done = run_train(*FLUX_PAIRS, "--pairs_dir", str(flux_pairs))  # a complete folder: nothing left to generate
    assert done.returncode == 0, done.stderr[-800:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["complete"] is True
