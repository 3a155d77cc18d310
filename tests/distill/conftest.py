import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# tiny models, many short runs: one thread avoids oversubscription on the shared 2-core machines, and the
# subprocess runs below use the same count, so their floating-point results match in-process ones bit for bit
torch.set_num_threads(1)


def _run_train(*argv: str, hang: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess | None:
    """`python -m diffaccel.distill.train ARGV` in a fresh process. With `hang`, wait until the run reaches that
    test point ($DIFFACCEL_TEST_HANG), SIGKILL it and return None."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "diffaccel.distill.train", *argv, "--threads", "1"]
    if hang is None:
        env.pop("DIFFACCEL_TEST_HANG", None)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    env["DIFFACCEL_TEST_HANG"] = hang
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:  # the hook prints "HANG <point>" and then sleeps until killed
            if line.startswith(f"HANG {hang}"):
                break
        else:
            raise AssertionError(f"run ended (rc={proc.wait()}) without reaching test point {hang}")
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
    return None


@pytest.fixture(scope="session")
def run_train():
    """The subprocess runner (see `_run_train`)."""
    return _run_train


@pytest.fixture(scope="session")
def pair_args() -> tuple[str, ...]:
    return PAIR_ARGS


@pytest.fixture(scope="session")
def tiny_teacher():
    """The zoo's random-weight tiny SD pipeline, wrapped as a 2-step DDIM teacher."""
    from diffaccel.distill.teachers import make_teacher

    return make_teacher("random-sd", solver="ddim", steps=2)


PAIR_ARGS = ("--stage", "pairs", "--pretrained_teacher_model", "random-sd", "--teacher_steps", "2",
             "--num_pairs", "24", "--pair_shard_size", "8", "--pair_batch_size", "4", "--seed", "3")


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """24 couplings of the tiny teacher in 3 shards (made in this process)."""
    from diffaccel.distill.train import main

    root = tmp_path_factory.mktemp("pairs") / "pairs"
    main([*PAIR_ARGS, "--pairs_dir", str(root)])
    return root
