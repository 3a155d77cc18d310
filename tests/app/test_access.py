"""The demo is safe to expose: on a non-loopback address visitors reach zoo pipelines and folders under --models-dir
only, messages reveal nothing outside it, every API field is checked on the server, and the queue is bounded.

The served test listens on this machine's own non-loopback interface address when it has one (else on 0.0.0.0,
which is not loopback either) and is driven with `gradio_client`, which bypasses the page's sliders.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from diffaccel.app import RunRequest, build_app
from diffaccel.app.access import LocalAccess, check_no_custom_code, is_loopback
from diffaccel.app.runner import FAMILIES, DemoRunner, RunInputError, load_pipeline
from diffaccel.core import InputError
from served import gradio_client, predict, serve

SMALL = dict(model="digits-dit", prompt="3", seed=0, num_images=1, baseline_steps=2, guidance_scale=4.0,
             sampler="DDIM", steps=2, time_shift=False, cache="none", ep_schedule="sd50-scaled", ep_parallel=True,
             cache_plan=None, fora_interval=2, steering="none", particles=2, potential="max", one_step=False)


def non_loopback_address() -> str:
    """This machine's address on its outward interface (no packet is sent), or 0.0.0.0 when it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
            addr = s.getsockname()[0]
        if not is_loopback(addr):
            with socket.socket() as probe:  # must be bindable here
                probe.bind((addr, 0))
            return addr
    except OSError:
        pass
    return "0.0.0.0"


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                       ("127.0.0.2", True), ("0.0.0.0", False), ("192.0.2.7", False),
                                       ("::", False)])
def test_loopback_detection(host, loop):
    assert is_loopback(host) is loop
    assert LocalAccess.for_host(host).restricted is (not loop)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models folder with one saved pipeline, a file, an escaping symlink, and a secret folder beside it."""
    from diffaccel import zoo

    root = tmp_path_factory.mktemp("served")
    models = root / "models"
    models.mkdir()
    zoo.load("random-dit").save_pretrained(models / "dit")
    (models / "notes.txt").write_text("x")
    secret = root / "secret"
    zoo.load("random-dit").save_pretrained(secret)
    (models / "escape").symlink_to(secret, target_is_directory=True)
    return models, secret


def test_restricted_server_without_models_dir_opens_zoo_only(models_dir):
    models, secret = models_dir
    access = LocalAccess.for_host("0.0.0.0")
    msgs = []
    for name in (str(secret), str(secret / "nope"), str(models / "notes.txt"), "/etc"):
        with pytest.raises(RunInputError) as ei:
            load_pipeline(name, access)
        msgs.append(str(ei.value).replace(repr(name), "NAME"))
    assert len(set(msgs)) == 1 and "zoo pipelines only" in msgs[0]  # same words whether the path exists or not
    assert load_pipeline("random-dit", access).family == "dit"


def test_models_dir_confines_local_folders(models_dir):
    models, secret = models_dir
    access = LocalAccess.for_host("0.0.0.0", models)
    assert load_pipeline("dit", access).family == "dit"
    assert load_pipeline(str(models / "dit"), access).family == "dit"  # absolute, but inside
    outside = [str(secret), "../secret", "dit/../../secret", "escape", str(models / "escape"), "/etc", "nope",
               "notes.txt"]
    msgs = set()
    for name in outside:
        with pytest.raises(RunInputError) as ei:
            load_pipeline(name, access)
        text = str(ei.value)
        assert str(secret) not in text.replace(repr(name), "") and str(models.parent) not in text.replace(repr(name),
                                                                                                        "")
        msgs.add(text.replace(repr(name), "NAME"))
    assert len(msgs) == 1, msgs  # existence, file-ness and folder-ness outside the models folder are not revealed
    with pytest.raises(InputError, match="--models-dir .* is not a folder"):
        LocalAccess.for_host("0.0.0.0", models / "notes.txt")


def test_loopback_keeps_any_local_folder(models_dir):
    _, secret = models_dir
    assert load_pipeline(str(secret), LocalAccess.for_host("127.0.0.1")).family == "dit"


def test_custom_code_components_are_refused(models_dir, tmp_path):
    import shutil

    models, _ = models_dir
    evil = tmp_path / "evil"
    shutil.copytree(models / "dit", evil)
    index = json.loads((evil / "model_index.json").read_text())
    index["transformer"] = ["my_module", "MyTransformer"]  # a module file inside the folder would be imported
    (evil / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="not a stock diffusers/transformers class"):
        check_no_custom_code(evil, FAMILIES, "evil")
    with pytest.raises(RunInputError, match="never runs code"):
        load_pipeline(str(evil), LocalAccess())
    for f in evil.rglob("*.safetensors"):  # pickled .bin weights only: refused (safetensors only)
        torch.save({}, f.with_suffix(".bin"))
        f.unlink()
    index["transformer"] = ["diffusers", "DiTTransformer2DModel"]
    (evil / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(RunInputError, match="safetensors"):
        load_pipeline(str(evil), LocalAccess())


@pytest.fixture(scope="module")
def exposed(models_dir, tmp_path_factory):
    models, secret = models_dir
    tmp = tmp_path_factory.mktemp("exposed")
    host = non_loopback_address()

    def build():
        runner = DemoRunner(max_models=2, access=LocalAccess.for_host(host, models))
        return build_app(RunRequest(model="digits-dit"), runner=runner, workdir=tmp / "runs", max_queue=4)

    with serve(build, tmp, host) as (demo, url):
        yield demo, url, tmp, secret, host


@pytest.fixture(scope="module")
def client(exposed):
    return gradio_client(exposed[1], exposed[2])


def _predict(client, **change):
    return predict(client, {**SMALL, **change})


def test_served_on_a_non_loopback_address(exposed, client):
    demo, _, _, _, host = exposed
    assert not is_loopback(host)
    print(f"exposed test server listened on {host}")
    message, baseline, accelerated, *_ = _predict(client)
    assert message.startswith("Done"), message
    assert len(baseline) == len(accelerated) == 1
    message = _predict(client, model="dit")[0]  # a folder under --models-dir
    assert message.startswith("Done"), message


def test_served_refuses_paths_outside_and_says_nothing_about_them(exposed, client):
    _, _, _, secret, _ = exposed
    texts = set()
    for name in (str(secret), "../secret", "escape", "/etc/passwd", "/nonexistent"):
        message = _predict(client, model=name)[0]
        assert message.startswith("**Cannot run:**") and str(secret.parent) not in message.replace(name, "")
        texts.add(message.replace(repr(name), "NAME"))
    assert len(texts) == 1, texts
    plan_message = _predict(client, cache="HarmoniCa plan", cache_plan=str(secret / "model_index.json"))[0]
    assert plan_message.startswith("**Cannot run:**") and "models folder" in plan_message


@pytest.mark.parametrize("field,value", [("num_images", 10_000), ("num_images", 0), ("steps", 100_000),
                                         ("baseline_steps", -3), ("particles", 1000), ("seed", -1),
                                         ("guidance_scale", 1e9), ("guidance_scale", "NaN"), ("prompt", "x" * 5000),
                                         ("model", "x" * 5000), ("time_shift", "yes"), ("steps", 2.5)])
def test_every_api_field_is_checked_on_the_server(client, field, value):
    message = _predict(client, **{field: value})[0]
    assert message.startswith("**Cannot run:**") and field in message, message


def test_queue_and_concurrency_are_bounded(exposed):
    demo = exposed[0]
    assert demo._queue.max_size == 4
    run = next(fn for fn in demo.fns.values() if fn.api_name == "run")
    assert run.concurrency_limit == 1


def test_cli_checks_models_dir_before_loading(tmp_path):
    from diffaccel.cli import main

    assert main(["app", "--host", "0.0.0.0", "--models-dir", str(tmp_path / "missing")]) == 2
    assert os.environ.get("GRADIO_SERVER_NAME") is None
    assert Path(tmp_path).is_dir()
