import json

import pytest
import torch
from diffaccel.distill.pairs import PairDataset, PairsError, PairWriter, pair_noise, pair_seed
from diffaccel.distill.teachers import SDPipelineTeacher, TeacherError, check_deterministic
from safetensors.torch import load_file


def _writer(root, teacher, **kw):
    base = dict(num_pairs=10, shard_size=4, seed=5, guidance_scale=2.0, batch_size=2)
    base.update(kw)
    return PairWriter(root, teacher, ["a handwritten digit one", "the number two", "handwritten nine"], **base)


def test_pairs_bit_reproducible_and_independent_of_shard_order(tmp_path, tiny_teacher):
    a, b = _writer(tmp_path / "a", tiny_teacher), _writer(tmp_path / "b", tiny_teacher)
    a.run(progress=False)
    b._check_or_create_manifest()
    for j in reversed(range(b.num_shards)):  # another order: every pair depends on its index only
        b.write_shard(j)
    b.run(progress=False)
    da, db = PairDataset.load(tmp_path / "a"), PairDataset.load(tmp_path / "b")
    assert len(da) == 10 and da.prompts == db.prompts
    assert torch.equal(da.z0, db.z0) and torch.equal(da.z1, db.z1)
    for j in range(3):
        name = f"shard-{j:05d}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # pair i's noise is a function of (seed, i), drawn on the CPU
    assert torch.equal(da.z0[7], pair_noise(5, [7], (4, 8, 8))[0].half().float())
    assert pair_seed(5, 7) != pair_seed(5, 8) and pair_seed(5, 7) != pair_seed(6, 7)
    assert not torch.equal(da.z1, da.z0)
    # another shard size gives the same pairs (fp16 storage of the same values)
    c = _writer(tmp_path / "c", tiny_teacher, shard_size=5)
    c.run(progress=False)
    assert torch.equal(PairDataset.load(tmp_path / "c").z0, da.z0)


def test_other_config_refused_and_nothing_overwritten(tmp_path, tiny_teacher):
    root = tmp_path / "p"
    _writer(root, tiny_teacher).run(progress=False)
    before = {f.name: f.read_bytes() for f in root.iterdir()}
    with pytest.raises(PairsError, match="another config.*guidance_scale"):
        _writer(root, tiny_teacher, guidance_scale=3.0).run(progress=False)
    assert {f.name: f.read_bytes() for f in root.iterdir()} == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(PairsError, match="not empty"):
        _writer(stray, tiny_teacher).run(progress=False)
    assert sorted(f.name for f in stray.iterdir()) == ["notes.txt"]


def test_corrupt_or_truncated_shard_named(tmp_path, tiny_teacher):
    root = tmp_path / "p"
    _writer(root, tiny_teacher).run(progress=False)
    shard = root / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PairsError, match="shard-00001.safetensors is corrupt or truncated"):
        PairDataset.load(root)
    with pytest.raises(PairsError, match="shard-00001.safetensors is corrupt"):  # resume does not replace it either
        _writer(root, tiny_teacher).run(progress=False)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PairsError, match="shard-00001.safetensors is corrupt or truncated"):
        PairDataset.load(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["complete"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PairsError, match="incomplete"):
        PairDataset.load(root)


def test_stochastic_teacher_and_bad_guidance_refused(tiny_teacher):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    for sched in (DDPMScheduler(), EulerAncestralDiscreteScheduler(),
                  DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")):
        with pytest.raises(TeacherError, match="stochastic"):
            check_deterministic(sched)
    with pytest.raises(TeacherError, match="unknown teacher solver"):
        SDPipelineTeacher(tiny_teacher.pipe, solver="ddpm")
    z0 = torch.zeros(1, 4, 8, 8)
    for w in (0.0, -1.0):
        with pytest.raises(TeacherError, match="must be > 0"):
            tiny_teacher(z0, ["x"], w)


def test_pairs_killed_mid_shard_then_resumed_give_the_same_dataset(tmp_path, tiny_pairs, pair_args, run_train):
    """SIGKILL a real run while shard 1 is half computed; the restart finishes with exactly the uninterrupted
    dataset (no lost or duplicated pairs). A shard renamed into place whose sidecar was never written (a kill
    between the two) is treated as unfinished and regenerated."""
    from diffaccel.distill.train import main

    root = tmp_path / "pairs"
    args = [*pair_args, "--pairs_dir", str(root)]
    run_train(*args, hang="pairs:shard1:batch0")
    assert (root / "shard-00000.json").exists() and not (root / "shard-00001.json").exists()
    assert not json.loads((root / "manifest.json").read_text())["complete"]
    with pytest.raises(PairsError, match="incomplete"):
        PairDataset.load(root)
    main(args)  # resume in this process (same thread count, so the same floating-point results)
    got, ref = PairDataset.load(root), PairDataset.load(tiny_pairs)
    assert torch.equal(got.z0, ref.z0) and torch.equal(got.z1, ref.z1) and got.prompts == ref.prompts
    indices = torch.cat([load_file(str(root / f"shard-{j:05d}.safetensors"))["index"] for j in range(3)])
    assert indices.tolist() == list(range(24))
    assert not list(root.glob("*.tmp"))
    # the state a kill between rename and sidecar leaves: the shard is redone, the result is the same
    (root / "shard-00002.json").unlink()
    (root / "shard-00002.safetensors").write_bytes(b"half")
    main(args)
    assert torch.equal(PairDataset.load(root).z1, ref.z1)
