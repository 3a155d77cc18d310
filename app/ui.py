"""The Gradio layer of the demo: controls, two galleries, the metrics table and a download; all logic is in
`app.runner`. `build_app()` returns a `gr.Blocks` with a queue (one generation at a time); `DemoApp` owns the runner
(and with it the model cache) and a private folder for the downloadable archives — there is no module-level state.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from PIL import Image

from ..core import tensor_to_pil
from .runner import (
    CACHES,
    DEFAULT_GUIDANCE,
    EP_SCHEDULES,
    LIMITS,
    METRIC_HEADERS,
    ONE_STEP_ENTRY,
    ONE_STEP_TEACHER,
    SAMPLERS,
    STEERING,
    TEXT_LIMITS,
    DemoRunner,
    RunInputError,
    RunRequest,
    RunResult,
    shipped_plan_names,
    zoo_family,
    zoo_pipelines,
)

DISPLAY_SIZE = 128  # digits are 32x32: shown enlarged (nearest neighbour), downloaded at native size
#: the order of the Run event's inputs (also the order of a `gradio_client` call's arguments)
INPUT_FIELDS: tuple[str, ...] = (
    "model", "prompt", "seed", "num_images", "baseline_steps", "guidance_scale", "sampler", "steps", "time_shift",
    "cache", "ep_schedule", "ep_parallel", "cache_plan", "fora_interval", "steering", "particles", "potential",
    "one_step",
)
CSS = ("#speedup {font-size: 1.15em} #message {min-height: 1.5em} "
       "#baseline-gallery img, #accelerated-gallery img {image-rendering: pixelated}")


def _display(images, seeds: list[int]) -> list[tuple[Image.Image, str]]:
    out = []
    for im, seed in zip(tensor_to_pil(images, value_range=(0, 255)), seeds, strict=True):
        if max(im.size) < DISPLAY_SIZE:
            scale = DISPLAY_SIZE // max(im.size)
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        out.append((im, f"seed {seed}"))
    return out


def speedup_text(result: RunResult) -> str:
    """One line for the page: the measured speed-up and both seconds per image."""
    b, a = result.baseline, result.accelerated
    s = result.speedup
    seeds = f"{result.seeds[0]}–{result.seeds[-1]}" if len(result.seeds) > 1 else str(result.seeds[0])
    slower = " (slower: steering/search spends extra compute on quality)" if s < 1 and \
        result.request.steering != "none" else ""
    return (f"**Speed-up: {s:.2f}×**{slower} — baseline {b.seconds_per_image:.4f} s/image, accelerated "
            f"{a.seconds_per_image:.4f} s/image; same seeds {seeds}, {len(result.seeds)} image(s), "
            f"model {result.model_description}")


class DemoApp:
    """The demo: a runner (pipelines in an LRU cache) plus a folder for downloads, and the Blocks built on them."""

    def __init__(self, runner: DemoRunner | None = None, defaults: RunRequest | None = None,
                 workdir: str | Path | None = None, keep_archives: int = 20, max_queue: int = 16) -> None:
        self.runner = runner or DemoRunner()
        self.max_queue = max_queue
        self.defaults = defaults or RunRequest()
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="diffaccel-app-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_archives = keep_archives
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------------------------------------ events

    def request_from(self, values: dict[str, Any]) -> RunRequest:
        """A `RunRequest` from widget values (unknown keys are an error, missing keys take the defaults)."""
        unknown = set(values) - {f.name for f in dataclasses.fields(RunRequest)}
        if unknown:
            raise RunInputError(f"unknown request fields: {', '.join(sorted(unknown))}")
        values = dict(values)
        if values.get("cache_plan") in ("", None):
            values["cache_plan"] = None
        return dataclasses.replace(self.defaults, **values)

    def run(self, values: dict[str, Any], progress: Any = None) -> tuple:
        """Run one comparison; returns the outputs of the Run event. Errors become a message, never a traceback."""
        import gradio as gr

        empty = ([], [], "", [], None, {})
        try:
            request = self.request_from(values)
            result = self.runner.run(request, progress=(lambda f, d: progress(f, desc=d)) if progress else None)
        except RunInputError as exc:
            gr.Warning(str(exc))
            return (f"**Cannot run:** {exc}", *empty)
        except Exception as exc:  # noqa: BLE001 - the app must keep serving; the traceback goes to the server log
            traceback.print_exc(file=sys.stderr)
            gr.Warning(f"unexpected error: {type(exc).__name__}: {exc}")
            return (f"**Error:** unexpected {type(exc).__name__}: {exc} (details in the server log)", *empty)
        archive = self._archive(result)
        notes = result.notes + result.accelerated.notes
        message = "Done." + (" Notes: " + "; ".join(notes) + "." if notes else "")
        return (message, _display(result.baseline.images, result.seeds),
                _display(result.accelerated.images, result.seeds), speedup_text(result), result.metrics_rows(),
                str(archive), result.as_dict())

    def _archive(self, result: RunResult) -> Path:
        path = self.workdir / f"diffaccel-run-{next(self._counter):04d}-seed{result.request.seed}.zip"
        path.write_bytes(result.zip_bytes())
        old = sorted(self.workdir.glob("diffaccel-run-*.zip"))[:-self.keep_archives]
        for p in old:
            p.unlink(missing_ok=True)
        return path

    # ------------------------------------------------------------------------------------------------ layout

    def build(self) -> Any:
        import gradio as gr

        from ..samplers.steering.potentials import POTENTIALS

        d = self.defaults
        caches = list(CACHES)
        plans = shipped_plan_names()
        models = zoo_pipelines()
        access = self.runner.access
        model_info = ("zoo pipeline, local diffusers pipeline folder, or a hub id already in the local cache "
                      "(offline)") if access.anywhere else f"zoo pipeline, or {access.describe()}"
        if d.model not in models:
            models = [d.model, *models]
        guidance = d.guidance_scale if d.guidance_scale is not None else _guidance_for(d.model) or 7.5

        with gr.Blocks(title="diffaccel: baseline vs accelerated") as demo:
            gr.Markdown("# diffaccel — baseline vs accelerated\nThe same prompt and seeds generated twice: the "
                        "pipeline's own scheduler (baseline) and the acceleration you choose. Seconds per image, "
                        "NFE and on-batch quality (digits-features class accuracy, CLIP score with digits-clip) are "
                        "measured on this machine for this batch.")
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    with gr.Group():
                        model = gr.Dropdown(models, value=d.model, allow_custom_value=True, label="model",
                                            info=model_info, elem_id="model")
                        prompt = gr.Textbox(d.prompt, label="prompt (DiT: the digit named is the class label)",
                                            max_length=TEXT_LIMITS["prompt"], elem_id="prompt")
                        with gr.Row():
                            seed = gr.Number(d.seed, label="seed", precision=0, minimum=LIMITS["seed"][0],
                                             maximum=LIMITS["seed"][1], elem_id="seed")
                            num_images = gr.Slider(*LIMITS["num_images"], value=d.num_images, step=1,
                                                   label="images", elem_id="num-images")
                        with gr.Row():
                            baseline_steps = gr.Slider(*LIMITS["baseline_steps"], value=d.baseline_steps, step=1,
                                                       label="baseline steps", elem_id="baseline-steps")
                            guidance_scale = gr.Slider(*LIMITS["guidance_scale"], value=guidance, step=0.5,
                                                       label="guidance scale", elem_id="guidance")
                    run_button = gr.Button("Run", variant="primary", elem_id="run-button")
                    with gr.Accordion("sampler", open=True):
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLERS), value=d.sampler, label="sampler",
                                                  elem_id="sampler")
                            steps = gr.Slider(*LIMITS["steps"], value=d.steps, step=1, label="accelerated steps",
                                              elem_id="steps")
                        time_shift = gr.Checkbox(d.time_shift, label="Time-Shift (Li et al. 2024)",
                                                 elem_id="time-shift")
                    with gr.Accordion("cache", open=True):
                        cache = gr.Radio(caches, value=d.cache if d.cache in caches else "none", label="cache",
                                         elem_id="cache")
                        with gr.Row():
                            ep_schedule = gr.Dropdown(list(EP_SCHEDULES), value=d.ep_schedule,
                                                      label="encoder-propagation key steps")
                            ep_parallel = gr.Checkbox(d.ep_parallel, label="parallel decoding")
                        with gr.Row():
                            cache_plan = gr.Dropdown(plans, value=d.cache_plan or (plans[0] if plans else None),
                                                     allow_custom_value=True, label="HarmoniCa plan",
                                                     interactive=True)
                            fora_interval = gr.Slider(*LIMITS["fora_interval"], value=d.fora_interval, step=1,
                                                      label="FORA interval", interactive=True)
                    with gr.Accordion("steering / search", open=True):
                        steering = gr.Radio(list(STEERING), value=d.steering, label="steering / search",
                                            elem_id="steering")
                        with gr.Row():
                            particles = gr.Slider(*LIMITS["particles"], value=d.particles, step=1,
                                                  label="N (best-of-N) / k (FK particles)")
                            potential = gr.Dropdown(list(POTENTIALS), value=d.potential, label="FK potential")
                    with gr.Accordion("one-step student", open=True):
                        one_step = gr.Checkbox(
                            d.one_step, interactive=True, elem_id="one-step",
                            label=f"one-step student {ONE_STEP_ENTRY} (model {ONE_STEP_TEACHER})")
                with gr.Column(scale=2):
                    message = gr.Markdown("", elem_id="message")
                    speedup = gr.Markdown("", elem_id="speedup")
                    with gr.Row():
                        baseline_gallery = gr.Gallery(label="baseline", columns=2, format="png", height=420,
                                                      object_fit="contain", elem_id="baseline-gallery")
                        accelerated_gallery = gr.Gallery(label="accelerated", columns=2, format="png", height=420,
                                                         object_fit="contain", elem_id="accelerated-gallery")
                    metrics = gr.Dataframe(headers=METRIC_HEADERS, label="metrics (this batch, this machine)",
                                           interactive=False, wrap=True, elem_id="metrics")
                    download = gr.File(label="download: PNGs of both sides + metrics.json", elem_id="download")
                    with gr.Accordion("details (JSON)", open=False):
                        details = gr.JSON(elem_id="details")

            widgets = dict(model=model, prompt=prompt, seed=seed, num_images=num_images,
                           baseline_steps=baseline_steps, guidance_scale=guidance_scale, sampler=sampler,
                           steps=steps, time_shift=time_shift, cache=cache, ep_schedule=ep_schedule,
                           ep_parallel=ep_parallel, cache_plan=cache_plan, fora_interval=fora_interval,
                           steering=steering, particles=particles, potential=potential, one_step=one_step)
            assert tuple(widgets) == INPUT_FIELDS

            def on_run(*values: Any, progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008 (gradio API)
                return self.run(dict(zip(INPUT_FIELDS, values, strict=True)), progress)

            run_button.click(on_run, inputs=list(widgets.values()),
                             outputs=[message, baseline_gallery, accelerated_gallery, speedup, metrics, download,
                                      details], api_name="run", concurrency_limit=1,  # one run at a time
                             preprocess=False)  # raw values: our validation names the field and the allowed range

            def on_model(name: str) -> Any:
                g = _guidance_for(name)
                return gr.update() if g is None else gr.update(value=g)

            model.change(on_model, inputs=model, outputs=guidance_scale, api_name=False)

            def on_plan(name: str | None) -> tuple:
                """A plan fixes the step count and scheduler it was trained for: preset both."""
                made_for = _plan_setting(name)
                if made_for is None:
                    return gr.update(), gr.update()
                n, sampler_name = made_for
                return gr.update(value=n), gr.update() if sampler_name is None else gr.update(value=sampler_name)

            cache_plan.change(on_plan, inputs=cache_plan, outputs=[steps, sampler], api_name=False)

            def on_cache(kind: str, name: str | None) -> tuple:
                return on_plan(name) if kind == "HarmoniCa plan" else (gr.update(), gr.update())

            cache.change(on_cache, inputs=[cache, cache_plan], outputs=[steps, sampler], api_name=False)
        demo.queue(default_concurrency_limit=1, max_size=self.max_queue)  # one run at a time; a bounded wait
        return demo


_SAMPLER_OF_SCHEDULER = {"DDIMScheduler": "DDIM", "DPMSolverMultistepScheduler": "DPM-Solver++",
                         "UniPCMultistepScheduler": "UniPC"}


def _plan_setting(name: str | None) -> tuple[int, str | None] | None:
    """(steps, sampler) a HarmoniCa plan was made for — the accelerated side must match both — or None if the plan
    cannot be read (the run then reports why)."""
    from ..caching import CachePlan, shipped_plans

    if not name:
        return None
    try:
        plan = CachePlan.load(shipped_plans().get(name, name))
    except Exception:  # noqa: BLE001 - an unreadable plan is reported when the run is attempted
        return None
    return plan.num_steps, _SAMPLER_OF_SCHEDULER.get(plan.scheduler_class or "")


def _guidance_for(name: str) -> float | None:
    family = zoo_family(name or "")
    return DEFAULT_GUIDANCE.get(family) if family else None


def build_app(defaults: RunRequest | None = None, runner: DemoRunner | None = None,
              workdir: str | Path | None = None, max_queue: int = 16) -> Any:
    """The demo's `gr.Blocks` (queue enabled); serve it with `launch(demo)`. `workdir` keeps the downloadable
    archives (default: a private temporary folder removed at exit)."""
    app = DemoApp(runner=runner, defaults=defaults, workdir=workdir, max_queue=max_queue)
    demo = app.build()
    demo.diffaccel_app = app  # keep the owner (runner, model cache, download folder) alive with the Blocks
    return demo


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = None, prevent_thread_lock: bool = False) -> str:
    """Serve the demo (the page's CSS is passed here, as gradio 6 expects); returns the local URL."""
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock,
                            show_error=False, quiet=True, css=CSS, footer_links=["api"],
                            max_threads=4)  # the web server's own worker threads; runs are queued one at a time
    return url
