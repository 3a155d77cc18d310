"""Communicator: a dead or hung rank is named within the timeout; config validation; single-process no-op."""

import time

import pytest
import torch
from diffaccel.parallel import ByteMeter, CommRecord, PatchParallelConfig, PatchParallelError, parallelize


def _failure(scenario: str) -> dict:
    import workers as _workers
    from distributed import run_distributed

    res = run_distributed(_workers.suite, 2, [scenario], timeout_s=150, allow_missing=True, allow_errors=True,
                          ranks_needed=[0])
    return res[0][scenario]


def test_killed_rank_is_named_within_timeout():
    r = _failure("dead_rank")
    assert r["error"] is not None and r["error"].startswith("CommunicationError")
    assert "unresponsive: rank 1 (process exited)" in r["error"]
    assert r["seconds"] < 20 + 5  # timeout_s plus the roll-call grace


def test_hung_rank_times_out_naming_it():
    t0 = time.monotonic()
    r = _failure("hung_rank")
    assert "unresponsive: rank 1 (process alive but unresponsive)" in r["error"]
    assert 4 <= r["seconds"] < 4 + 10  # timeout plus the roll-call grace (slack for a loaded machine)
    assert time.monotonic() - t0 < 120  # the sleeping rank was killed, nothing hung


def test_config_validation():
    assert PatchParallelConfig(mode="distrifusion").mode == "displaced"
    for bad in (dict(mode="fast"), dict(gn_mode="x"), dict(warmup_steps=-1), dict(pcpp_fraction=-0.1),
                dict(timeout_s=0), dict(halo_transport="carrier-pigeon"), dict(stats_dtype=torch.float16),
                dict(skip_transfers=True, blocking_transfers=True), dict(pcpp_hops=2)):
        with pytest.raises(PatchParallelError):
            PatchParallelConfig(**bad)


def test_single_process_is_a_no_op():
    from workers import call, tiny_unet, unet_inputs

    model = tiny_unet()
    inputs = unet_inputs(batch=1)
    ref = call(model, inputs)
    handle = parallelize(model, PatchParallelConfig(mode="displaced"))
    assert not handle.enabled
    assert torch.equal(call(model, inputs), ref)
    assert handle.comm_report()["world_size"] == 1


def test_unsupported_model_refused_without_process_group():
    from diffusers import UNet2DModel

    m = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(PatchParallelError, match="unsupported model UNet2DModel"):
        parallelize(m)


def test_byte_meter_summary():
    meter = ByteMeter()
    meter.add(CommRecord(0, "a", "attn_kv", "all_gather", 2, 100, 100, False, "sync"))
    meter.add(CommRecord(1, "a", "attn_kv", "all_gather", 2, 60, 100, True, "displaced"))
    meter.add(CommRecord(2, "c", "conv_halo", "p2p", 2, 10, 10, True, "displaced"))
    s = meter.summary()
    assert s["phases"]["sync"]["calls"] == 1 and s["phases"]["displaced"]["calls"] == 2
    assert s["phases"]["displaced"]["wire_bytes_per_call"]["attn_kv"] == 50
    assert s["phases"]["displaced"]["logical_bytes_per_call"]["conv_halo"] == 5
    assert meter.per_call()[2]["conv_halo"] == 10 and s["total_wire_bytes"] == 210
