"""`diffaccel fid` contract: JSON output, stats reuse, bad inputs with one-line errors and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffaccel.cli import main
from diffaccel.core import tensor_to_pil
from diffaccel.evals import reference_images
from PIL import Image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    for name, split, count in (("a", "train", 40), ("b", "test", 30)):
        (root / name).mkdir()
        for i, im in enumerate(tensor_to_pil(reference_images(split)[:count], value_range=(0, 255))):
            im.save(root / name / f"{i:03d}.png")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["fid", *map(str, argv)])
    except SystemExit as exc:  # usage errors (an invalid option value) exit through argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_two_folders_json(folders, capsys):
    code, out, err = run(capsys, folders / "a", folders / "b", "--json", "--kid", "--kid-subsets", "5")
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout; progress and logs on stderr
    assert {"fid", "extractor", "resize", "n_a", "n_b", "kid_mean", "kid_std", "dims"} <= set(result)
    assert (result["extractor"], result["resize"], result["n_a"], result["n_b"], result["dims"]) == \
        ("domain:digits-features", "clean", 40, 30, 128)
    assert result["fid"] > 0 and "[fid]" in err


def test_saved_stats_give_the_same_fid(folders, capsys, tmp_path):
    stats = tmp_path / "a.npz"
    code, out, _ = run(capsys, folders / "a", folders / "b", "--json", "--save-stats", stats, "--save-features")
    assert code == 0 and stats.is_file()
    direct = json.loads(out)["fid"]
    code, out, _ = run(capsys, stats, folders / "b", "--json", "--kid", "--kid-subsets", "3")
    assert code == 0 and json.loads(out)["fid"] == direct and "kid_mean" in json.loads(out)
    # the human form keeps pytorch-fid's leading token
    code, out, _ = run(capsys, stats, folders / "b", "-q")
    assert code == 0 and out.startswith("FID: ") and "extractor=domain:digits-features" in out
    # one folder + --save-stats only writes; an existing file is refused without --force and left untouched
    before = stats.read_bytes()
    code, _, err = run(capsys, folders / "b", "--save-stats", stats)
    assert code == 2 and "exists" in err and stats.read_bytes() == before
    code, _, _ = run(capsys, folders / "b", "--save-stats", stats, "--force", "-q")
    assert code == 0 and stats.read_bytes() != before


def test_worker_processes_give_the_same_numbers(folders, capsys):
    serial = json.loads(run(capsys, folders / "a", folders / "b", "--json", "--batch-size", "16")[1])["fid"]
    code, out, _ = run(capsys, folders / "a", folders / "b", "--json", "--num-workers", "2", "--batch-size", "16")
    assert code == 0 and json.loads(out)["fid"] == serial


def test_stats_made_with_another_resize_are_refused(folders, capsys, tmp_path):
    stats = tmp_path / "tf.npz"
    assert run(capsys, folders / "a", "--save-stats", stats, "--resize", "legacy-tf", "-q")[0] == 0
    code, _, err = run(capsys, stats, folders / "b")
    assert code == 2 and "resize" in err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_fail_cleanly_and_write_nothing(folders, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        Image.new("L", (32, 32), color=i * 50).save(corrupt / f"{i}.png")
    (corrupt / "3_truncated.png").write_bytes((corrupt / "0.png").read_bytes()[:40])
    single = tmp_path / "single"
    single.mkdir()
    Image.new("L", (32, 32)).save(single / "0.png")
    wrong_keys = tmp_path / "wrong_keys.npz"
    np.savez(wrong_keys, m2=np.zeros(128), s2=np.eye(128))
    wrong_shape = tmp_path / "wrong_shape.npz"
    np.savez(wrong_shape, mu=np.zeros(128), sigma=np.eye(64))
    out_stats = tmp_path / "out.npz"
    cases = [
        ((empty, folders / "b"), "empty"),
        ((text_only, folders / "b"), "no images found"),
        ((folders / "a", corrupt), "3_truncated.png"),
        ((single, folders / "b"), "at least 2"),
        ((folders / "a", wrong_keys), "missing key"),
        ((folders / "a", wrong_shape), "mu must be"),
        ((tmp_path / "nope", folders / "b"), "no such"),
        ((folders / "a", folders / "b", "--extractor", "vgg"), "unknown extractor"),
        ((folders / "a", folders / "b", "--batch-size", "0"), "batch-size"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv, "--save-stats", out_stats)
        assert code == 2, (argv, err)
        assert message in _one_line_error(err), (argv, err)
        assert out == "" and not out_stats.exists()
        assert "Traceback" not in err


def test_mixed_sizes_are_resized_by_the_stated_mode(tmp_path, capsys, folders):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, size in enumerate((32, 32, 24, 48)):
        Image.new("L", (size, size), color=40 * i).save(mixed / f"{i}.png")
    code, out, err = run(capsys, mixed, folders / "b", "--json")
    assert code == 0
    assert any("3 sizes" in w for w in json.loads(out)["warnings"])
    assert "resized to 32x32 by mode 'clean'" in err


def test_missing_inception_weights_exit_3(folders, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFACCEL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = run(capsys, folders / "a", folders / "b", "--extractor", "inception")
    assert code == 3 and out == ""
    line = _one_line_error(err)
    assert "pt_inception-2015-12-05-6726825d.pth" in line and "No download was attempted" in line
    code, out, err = run(capsys, folders / "a", folders / "b", "--extractor", f"clip:{tmp_path / 'no-clip'}")
    assert code == 3 and out == "" and "no-clip" in _one_line_error(err)


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fid", "--help"])
    assert info.value.code == 0
    assert "Exit codes" in capsys.readouterr().out
