"""The evaluation harness on random-weight tiny pipelines (numbers are meaningless; the bookkeeping is not)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffaccel.cli import main
from diffaccel.evals import BenchConfig, EvalResult, evaluate, format_table, run_bench
from diffaccel.evals.errors import EvalInputError
from diffaccel.zoo import load

STEPS = 3


@pytest.fixture(scope="module")
def ddpm():
    torch.manual_seed(0)
    return load("random-ddpm")


def test_evaluate_unconditional_pipeline(ddpm):
    r = evaluate(ddpm, None, num_images=4, seed=0, batch_size=2, num_inference_steps=STEPS, keep_images=True,
                 clip_model=None)
    assert isinstance(r, EvalResult)
    assert r.nfe_per_image == STEPS and r.denoiser_rows_per_image == STEPS
    assert r.flops_per_image is not None and r.flops_per_image > 0
    assert r.images.shape == (4, 3, 16, 16) and r.images.dtype == torch.uint8
    assert r.images_per_second > 0 and r.seconds_per_image > 0
    assert (r.n_a, r.n_b, r.kid_subset_size) == (4, 360, 4)
    assert r.extractor == "domain:digits-features" and r.resize == "clean" and r.reference == "zoo digits test split"
    assert r.class_accuracy is None and r.clip_score is None and r.fid > 0
    d = r.as_dict()
    assert "images" not in d and json.loads(json.dumps(d))["call_kwargs"] == {"num_inference_steps": STEPS}


def _same_up_to_one_level(x: torch.Tensor, y: torch.Tensor) -> bool:
    diff = (x.int() - y.int()).abs()
    return int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99


def test_image_i_depends_on_seed_plus_i_not_on_batching(ddpm):
    a = evaluate(ddpm, None, 4, 5, batch_size=4, num_inference_steps=STEPS, keep_images=True, count_flops=False,
                 clip_model=None)
    b = evaluate(ddpm, None, 4, 5, batch_size=1, num_inference_steps=STEPS, keep_images=True, count_flops=False,
                 clip_model=None)
    c = evaluate(ddpm, None, 4, 6, batch_size=4, num_inference_steps=STEPS, keep_images=True, count_flops=False,
                 clip_model=None)
    # same noise per image; batch-size-dependent kernels may move a float by ~1e-6, i.e. one uint8 level at most
    assert _same_up_to_one_level(a.images, b.images)
    assert _same_up_to_one_level(a.images[1:], c.images[:3])  # seed 6 starts where seed 5's second image was
    assert not _same_up_to_one_level(a.images, c.images)
    assert b.nfe_per_image == STEPS  # four calls of one image each: still STEPS evaluations per image


@pytest.mark.parametrize("recipe, rows", [("best-of-n:2", 2 * 2), ("fk:2:every=1:start=1:end=2", 2 * 2)])
def test_searches_count_the_steps_each_image_went_through(recipe, rows):
    """Best-of-N searches prompt by prompt, FK steers the batch at once: either way NFE per image is the step count
    (not the batch's total), and the rows count every candidate / particle and the CFG half."""
    from diffaccel import accelerate

    pipe = load("random-sd")
    with accelerate(pipe, f"ddim@{STEPS} + {recipe}") as h:
        r = evaluate(h.as_pipeline(), [1, 2], 4, 0, batch_size=4, count_flops=False, clip_model=None,
                     guidance_scale=2.0)
    assert r.nfe_per_image == STEPS and r.denoiser_rows_per_image == rows * STEPS


def test_text_and_class_conditional_pipelines():
    sd = load("random-sd")
    r = evaluate(sd, [3, "a handwritten digit seven"], 4, 0, num_inference_steps=STEPS, guidance_scale=2.0,
                 count_flops=False)
    assert r.nfe_per_image == STEPS and r.denoiser_rows_per_image == 2 * STEPS  # batched CFG doubles the rows
    assert r.class_accuracy is not None and 0.0 <= r.class_accuracy <= 1.0
    dit = load("random-dit")
    r = evaluate(dit, [1, 2], 2, 0, num_inference_steps=STEPS, count_flops=False, clip_model=None)
    assert r.pipeline == "DiTPipeline" and r.class_accuracy is not None
    with pytest.raises(EvalInputError, match="class label"):
        evaluate(dit, ["a cat"], 2, 0, num_inference_steps=STEPS)


def test_unconditional_pipeline_refuses_prompts(ddpm):
    with pytest.raises(EvalInputError, match="unconditional"):
        evaluate(ddpm, ["a handwritten digit one"], 2, 0, num_inference_steps=STEPS)
    with pytest.raises(EvalInputError, match="num_images"):
        evaluate(ddpm, None, 1, 0)


def test_run_bench_and_table(ddpm):
    configs = [BenchConfig("ddpm-2", lambda: ddpm, {"num_inference_steps": 2}),
               BenchConfig("ddpm-3", lambda: ddpm, {"num_inference_steps": 3})]
    results = run_bench(configs, num_images=2, progress=False, count_flops=False, clip_model=None)
    assert [r.nfe_per_image for r in results] == [2, 3]
    table = format_table(results)
    assert "ddpm-2" in table and "ddpm-3" in table and "domain:digits-features" in table


def test_bench_cli_json(capsys):
    code = main(["bench", "--suite", "smoke", "-n", "2", "--steps", "2", "--config", "random-ddpm", "--no-flops",
                 "--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)["results"]
    assert len(rows) == 1 and rows[0]["nfe_per_image"] == 2 and rows[0]["name"] == "random-ddpm DDIM-2"
    assert main(["bench", "--suite", "nope"]) == 2


def test_bench_refuses_up_front_when_zoo_weights_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFACCEL_ZOO_DIR", str(tmp_path))  # an empty zoo: nothing trained
    assert main(["bench", "--suite", "baseline", "-n", "2"]) == 3
    err = capsys.readouterr().err
    assert "digits-ddpm" in err and "digits-dit" in err and "digits-sd" in err


def test_run_bench_pairs_rows_with_their_reference(ddpm):
    configs = [BenchConfig("ddpm-4", lambda: ddpm, {"num_inference_steps": 4}, reference="ddpm-8"),
               BenchConfig("ddpm-8", lambda: ddpm, {"num_inference_steps": 8}),
               BenchConfig("ddpm-8 again", lambda: ddpm, {"num_inference_steps": 8}, reference="ddpm-8")]
    results = run_bench(configs, num_images=2, progress=False, count_flops=False, clip_model=None)
    assert [r.name for r in results] == ["ddpm-4", "ddpm-8", "ddpm-8 again"]  # input order kept
    fewer, ref, again = results
    assert ref.paired is None and ref.images is None  # kept only for pairing, then dropped
    assert fewer.paired_with == "ddpm-8" and fewer.paired.n == 2 and fewer.paired.identical < 2
    assert math.isfinite(fewer.paired.psnr) and fewer.paired.ssim < 1.0 and fewer.paired.feature_dist > 0
    # the same computation on the same seeds: bit-identical images, reported JSON-safely
    assert again.paired.identical == 2 and again.as_dict()["paired"]["psnr"] is None
    json.dumps(again.as_dict(), allow_nan=False)
    table = format_table(results)
    assert "PSNR" in table and "inf" in table and "against the same seeds of ddpm-8" in table
    with pytest.raises(EvalInputError, match="not in this run"):
        run_bench(configs[:1], num_images=2, progress=False)


def test_bench_cli_reference_option(capsys):
    code = main(["bench", "--suite", "smoke", "-n", "2", "--steps", "2", "--config", "random-ddpm", "--no-flops",
                 "--reference", "random-ddpm DDIM-2", "--json", "-q"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["paired"] is None  # the reference itself is not paired with itself
    assert main(["bench", "--suite", "smoke", "-n", "2", "--steps", "2", "--config", "random-ddpm",
                 "--reference", "nope", "-q"]) == 2
