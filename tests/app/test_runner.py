"""The demo's generation layer (no UI): equivalence with the plain path, clean pipelines after every run,
validation messages, model resolution, and that every offered acceleration really runs."""

import io
import json
import zipfile

import pytest
import torch
from diffaccel.app.runner import (
    DemoRunner,
    ModelCache,
    RunInputError,
    RunRequest,
    load_pipeline,
    shipped_plan_names,
)
from tolerances import network_atol, uint8_atol

# tiny runs: 2 images, few steps, no warm-up (timing is not under test here)
SMALL = dict(num_images=2, baseline_steps=4, steps=4, warmup=0)


@pytest.fixture(scope="module")
def runner():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DemoRunner(max_models=4)
    torch.set_num_threads(threads)


def test_ddim_at_baseline_steps_equals_baseline(runner):
    """Equivalence: the accelerated side with DDIM at the baseline's steps, no cache and no steering is the plain
    pipeline, so both sides must be bit-identical (same seeds, same scheduler config)."""
    res = runner.run(RunRequest(model="digits-sd", sampler="DDIM", **SMALL))
    assert torch.equal(res.baseline.images, res.accelerated.images)
    assert res.baseline.nfe_calls == res.accelerated.nfe_calls == 4
    assert res.seeds == [0, 1]


def test_seeds_shared_and_per_image(runner):
    """Image i uses seed + i on both sides: a 1-image run at seed 1 equals image 1 of a 2-image run at seed 0."""
    two = runner.run(RunRequest(model="digits-dit", prompt="3", sampler="DDIM", **SMALL))
    one = runner.run(RunRequest(model="digits-dit", prompt="3", sampler="DDIM", seed=1,
                                **{**SMALL, "num_images": 1}))
    # a batch of 2 vs a batch of 1: same arithmetic in another blocking; float round-off of the 4 transformer
    # calls and the decode can move a pixel across a rounding boundary, one uint8 level
    pipe = runner.models.get("digits-dit").pipe
    levels = uint8_atol(network_atol(pipe.transformer, calls=SMALL["steps"]) + network_atol(pipe.vae.decoder))
    assert (two.baseline.images[1:].int() - one.baseline.images.int()).abs().max() <= levels


def test_no_hooks_or_scheduler_left_after_accelerated_run(runner):
    """A baseline after an accelerated run (encoder propagation hooks, S-PNDM; then Time-Shift) equals a fresh one."""
    plain = RunRequest(model="digits-sd", prompt="a handwritten digit four", sampler="DDIM", **SMALL)
    before = runner.run(plain)
    loaded = runner.models.get("digits-sd")
    scheduler = loaded.pipe.scheduler
    runner.run(RunRequest(model="digits-sd", prompt="a handwritten digit four", sampler="S-PNDM",
                          cache="encoder propagation", ep_schedule="uniform-2", **SMALL))
    runner.run(RunRequest(model="digits-sd", prompt="a handwritten digit four", sampler="UniPC", time_shift=True,
                          **SMALL))
    assert loaded.pipe.scheduler is scheduler
    assert not any("_diffusers_hook" in m.__dict__ for m in loaded.pipe.unet.modules())
    after = runner.run(plain)
    assert torch.equal(before.baseline.images, after.baseline.images)
    assert torch.equal(before.accelerated.images, after.accelerated.images)


def test_accelerated_context_undoes_on_error(runner):
    """An error inside the accelerated call still removes the hooks and restores the scheduler."""
    from diffaccel.app.runner import accelerated
    from diffaccel.core.schedulers import class_name

    loaded = runner.models.get("digits-sd")
    scheduler = loaded.pipe.scheduler
    request = RunRequest(model="digits-sd", cache="encoder propagation", sampler="UniPC", **SMALL)
    with pytest.raises(RuntimeError, match="boom"), accelerated(loaded, request):
        assert class_name(loaded.pipe.scheduler) == "UniPCMultistepScheduler"
        assert "_diffusers_hook" in loaded.pipe.unet.__dict__
        raise RuntimeError("boom")
    assert loaded.pipe.scheduler is scheduler
    assert not any("_diffusers_hook" in m.__dict__ for m in loaded.pipe.unet.modules())


def test_result_tables_and_zip(runner):
    res = runner.run(RunRequest(model="digits-sd", sampler="DPM-Solver++", **SMALL))
    rows = res.metrics_rows()
    assert [r[0] for r in rows] == ["baseline", "accelerated"]
    assert res.baseline.class_accuracy is not None and res.baseline.clip_score is not None
    assert res.speedup > 0
    with zipfile.ZipFile(io.BytesIO(res.zip_bytes())) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("metrics.json"))
    assert {"baseline/seed-0.png", "baseline/seed-1.png", "accelerated/seed-0.png", "metrics.json"} <= names
    assert meta["request"]["sampler"] == "DPM-Solver++" and meta["speedup"] == pytest.approx(res.speedup)


@pytest.mark.parametrize("change, needle", [
    ({"steps": 0}, "steps = 0 is out of range"),
    ({"num_images": 99}, "num_images = 99 is out of range"),
    ({"num_images": 2.5}, "num_images = 2.5 is not a whole number"),
    ({"guidance_scale": 50.0}, "guidance_scale = 50.0 is out of range"),
    ({"particles": 0, "steering": "FK steering", "sampler": "DDIM"}, "particles = 0 is out of range"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"sampler": "Euler"}, "sampler 'Euler' is unknown"),
    ({"sampler": "F-PNDM", "steps": 3}, "F-PNDM needs at least 4 steps"),
    ({"model": "digits-dit", "cache": "encoder propagation"}, "caches a UNet encoder"),
    ({"model": "digits-dit", "prompt": "a cat"}, "names no single digit"),
    ({"steering": "FK steering", "sampler": "UniPC"},
     "cannot be combined with unipc:grid=model: UniPCMultistepScheduler keeps"),
    ({"steering": "best-of-N", "particles": 1}, "best-of-N needs N >= 2"),
    ({"model": "digits-ddpm", "steering": "best-of-N"}, "drives Stable Diffusion, DiT, Flux and SD3 pipelines"),
    ({"model": "digits-sd", "cache": "FORA"}, "fora:2:steps=4 caches transformer blocks"),
    ({"one_step": True, "cache": "encoder propagation"}, "nothing to reuse"),
    ({"model": "digits-dit", "prompt": "1", "one_step": True}, "distilled from digits-sd"),
])
def test_invalid_requests_name_the_problem(runner, change, needle):
    with pytest.raises(RunInputError, match=None) as info:
        runner.run(RunRequest(**{**SMALL, **change}))
    assert needle in str(info.value)


# ---------------------------------------------------------------------------------------------- models


def test_model_resolution_messages(tmp_path):
    with pytest.raises(RunInputError, match="not a pipeline"):
        load_pipeline("digits-features")
    with pytest.raises(RunInputError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(RunInputError, match="is a file, not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path / "weights.bin"))
    with pytest.raises(RunInputError, match="runs offline"):
        load_pipeline("nobody-here/no-such-pipeline")
    with pytest.raises(RunInputError, match="unknown model"):
        load_pipeline("no such model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(RunInputError, match="broken/model_index.json is not valid JSON"):
        load_pipeline(str(broken))  # checked before diffusers is asked to load it


def test_local_pipeline_folder(tmp_path, runner):
    from diffaccel import zoo

    zoo.load("random-dit").save_pretrained(tmp_path / "dit")
    res = runner.run(RunRequest(model=str(tmp_path / "dit"), prompt="5", sampler="DDIM", **SMALL))
    assert res.model_description.endswith("(DiTPipeline)")
    assert torch.equal(res.baseline.images, res.accelerated.images)


def test_model_cache_is_lru():
    loads = []

    def loader(name):
        loads.append(name)
        return name

    cache = ModelCache(max_models=2, loader=loader)
    cache.get("a"), cache.get("b"), cache.get("a"), cache.get("c")
    assert cache.names() == ["a", "c"] and loads == ["a", "b", "c"]
    cache.get("b")
    assert loads == ["a", "b", "c", "b"]
    with pytest.raises(ValueError, match="max_models"):
        ModelCache(0)


# ---------------------------------------------------------------------------------------------- every method runs


@pytest.mark.slow
@pytest.mark.parametrize("request_kwargs", [
    dict(model="digits-sd", sampler="UniPC"),
    dict(model="digits-sd", sampler="F-PNDM"),
    dict(model="digits-sd", sampler="DDIM", time_shift=True),
    dict(model="digits-sd", sampler="DPM-Solver++", cache="encoder propagation", ep_schedule="uniform-2"),
    dict(model="digits-ddpm", sampler="S-PNDM", cache="encoder propagation", ep_schedule="uniform-2",
         ep_parallel=False),
    dict(model="digits-sd", sampler="DDIM", steering="best-of-N", particles=2),
    dict(model="digits-sd", sampler="S-PNDM", steering="best-of-N", particles=2),
    dict(model="digits-sd", sampler="UniPC", time_shift=True, cache="encoder propagation", ep_schedule="uniform-2"),
    dict(model="digits-sd", sampler="DDIM", steering="FK steering", particles=2, potential="diff"),
    dict(model="digits-dit", prompt="8", sampler="DDIM", steering="FK steering", particles=2),
    dict(model="digits-dit", prompt="8", sampler="UniPC", steering="best-of-N", particles=2),
    # compositions the demo refused before the protocol: cache + steering, Time-Shift + steering
    dict(model="digits-sd", sampler="DDIM", steering="best-of-N", particles=2, cache="encoder propagation",
         ep_schedule="uniform-2"),
    dict(model="digits-sd", sampler="DDIM", steering="FK steering", particles=2, cache="encoder propagation",
         ep_schedule="uniform-2"),
    dict(model="digits-dit", prompt="8", sampler="DDIM", steering="FK steering", particles=2, cache="FORA"),
    dict(model="digits-dit", prompt="8", sampler="DDIM", steering="FK steering", particles=2, time_shift=True),
    dict(model="random-pixart", prompt="a red square", sampler="DPM-Solver++"),
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_acceleration_runs(runner, request_kwargs):
    res = runner.run(RunRequest(**{**SMALL, **request_kwargs}))
    assert res.accelerated.images.shape == res.baseline.images.shape
    assert res.accelerated.images.dtype == torch.uint8
    assert res.accelerated.nfe_calls > 0 and res.accelerated.seconds_per_image > 0
    if request_kwargs.get("steering", "none") != "none":
        assert res.accelerated.evals_per_image == 4 * request_kwargs["particles"]  # k (or N) samples of 4 steps


@pytest.mark.slow
def test_transformer_caches_run(runner):
    dit = runner.models.get("digits-dit")
    res = runner.run(RunRequest(model="digits-dit", prompt="2", sampler="DDIM", cache="FORA", fora_interval=2,
                                **SMALL))
    assert res.accelerated.images.shape == res.baseline.images.shape
    assert "fora:2:steps=4" in res.accelerated.config
    # F-PNDM runs 4 + 9 model calls for 4 transitions: the FORA plan has one row per distinct timestep
    res = runner.run(RunRequest(model="digits-dit", prompt="2", sampler="F-PNDM", cache="FORA", fora_interval=3,
                                **SMALL))
    assert res.accelerated.nfe_calls == 13
    assert not any("_diffusers_hook" in m.__dict__ for m in dit.pipe.transformer.modules())
    plans = shipped_plan_names()
    from diffaccel.app.ui import _plan_setting

    steps, sampler = _plan_setting(plans[0])
    res = runner.run(RunRequest(model="digits-dit", prompt="2", cache="HarmoniCa plan", cache_plan=plans[0],
                                **{**SMALL, "steps": steps, "sampler": sampler or "DDIM"}))
    assert f"harmonica:{plans[0]}" in res.accelerated.config and res.accelerated.nfe_calls == steps
    # a plan used with another step count is refused with the cache's own message, and nothing stays attached
    with pytest.raises(RunInputError, match="cache plan was made for"):
        runner.run(RunRequest(model="digits-dit", prompt="2", cache="HarmoniCa plan", cache_plan=plans[0],
                              **{**SMALL, "steps": steps + 1, "sampler": sampler or "DDIM"}))
    assert not any("_diffusers_hook" in m.__dict__ for m in dit.pipe.transformer.modules())


@pytest.mark.slow
def test_one_step_student_runs(runner):
    res = runner.run(RunRequest(model="digits-sd", one_step=True, **SMALL))
    assert res.accelerated.nfe_calls == 1 and res.accelerated.images.shape == res.baseline.images.shape
