"""Reflow couplings (z0, z1, prompt) on disk: atomic shards, a manifest, per-index seeds, resume, corruption checks.

Pair i uses noise z0 ~ N(0, I) drawn on the CPU from a generator seeded with `pair_seed(seed, i)` (a stable 64-bit
hash), and prompt `prompts[i % len(prompts)]`; z1 = teacher(z0 | prompt). So pair i does not depend
on the shard size, the shard order or how many processes wrote the shards.

Layout of a pairs folder::

    manifest.json              config (teacher, solver, steps, guidance, shape, dtype, prompts, seed) + its hash;
                               "complete" and the shard list once every shard is written
    shard-00000.safetensors    z0, z1 (storage dtype), index, seed (int64); written to *.tmp then renamed
    shard-00000.json           sidecar: indices, seeds, prompts and the SHA-256 of the .safetensors file;
                               written after the shard, so a shard without its sidecar is incomplete

A restarted run regenerates only the shards without a sidecar; a shard whose bytes do not match its sidecar is
reported by name and never silently replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.files import atomic_write_bytes, atomic_write_text, sha256_file

FORMAT = "diffaccel-reflow-pairs/1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class PairsError(InputError):
    """A pairs folder cannot be used: another config, incomplete, or a corrupt/truncated shard (named)."""


def test_hook(point: str) -> None:
    """Testing aid: when $DIFFACCEL_TEST_HANG equals `point`, announce it on stdout and wait to be killed.

    The kill/resume tests use it to SIGKILL a run at a chosen point; it does nothing otherwise."""
    if os.environ.get("DIFFACCEL_TEST_HANG") == point:
        print(f"HANG {point}", flush=True)
        while True:
            time.sleep(1)


def pair_seed(seed: int, index: int) -> int:
    """Stable 63-bit seed of pair `index` under the global `seed` (SHA-256, not Python's salted hash())."""
    digest = hashlib.sha256(f"diffaccel-pairs:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def pair_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """z0 of the given pair indices, each from its own CPU generator (identical on every device/host)."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(pair_seed(seed, i)))
                        for i in indices])


def _atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def latent_shape(teacher) -> tuple[int, ...]:
    """One pair's latent shape (C, H, W): the teacher pipeline family's (unpacked, at its native size)."""
    from ..core.families import family_for

    return tuple(int(d) for d in family_for(teacher.pipe).latent_shape())


class PairWriter:
    """Writes `num_pairs` couplings from `teacher` into `root`, `shard_size` per shard, resuming what exists.

    `guidance_scale` is stored in the Imagen form (1.0 = no guidance)."""

    def __init__(self, root: str | Path, teacher, prompts: Sequence[str], *, num_pairs: int, shard_size: int = 256,
                 seed: int = 0, guidance_scale: float = 7.5, batch_size: int = 64, storage_dtype: str = "fp16"):
        from .teachers import check_guidance

        if num_pairs < 1 or shard_size < 1 or batch_size < 1:
            raise PairsError(f"num_pairs, shard_size and batch_size must be >= 1; got {num_pairs}, {shard_size}, "
                             f"{batch_size}")
        if not prompts:
            raise PairsError("the prompt list is empty")
        if storage_dtype not in STORAGE_DTYPES:
            raise PairsError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
        if not getattr(teacher, "deterministic", False):
            raise PairsError(f"teacher {type(teacher).__name__} is not deterministic; pairs need a function z0 -> z1")
        self.root, self.teacher = Path(root), teacher
        self.prompts = [str(p) for p in prompts]
        self.num_pairs, self.shard_size, self.seed = int(num_pairs), int(shard_size), int(seed)
        self.guidance_scale = check_guidance(guidance_scale)
        self.batch_size, self.storage_dtype = int(batch_size), storage_dtype
        self.shape = latent_shape(teacher)
        cfg = {"format": FORMAT, "teacher": teacher.describe(), "guidance_scale": self.guidance_scale,
               "guidance_form": "imagen (1 = off)", "latent_shape": list(self.shape), "dtype": storage_dtype,
               "seed": self.seed, "num_pairs": self.num_pairs, "shard_size": self.shard_size,
               "prompts": self.prompts, "batch_size": self.batch_size}
        self.config = cfg
        self.hash = config_hash(cfg)

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_indices(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.num_pairs))

    def _check_or_create_manifest(self) -> None:
        path = self.root / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("config_hash") != self.hash:
                diff = sorted(k for k in set(old.get("config", {})) | set(self.config)
                              if old.get("config", {}).get(k) != self.config.get(k))
                raise PairsError(f"pairs folder {self.root} was made with another config (hash "
                                 f"{old.get('config_hash')}, this run {self.hash}; differing: {', '.join(diff)}); "
                                 "use a new --pairs_dir or the same settings")
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise PairsError(f"pairs folder {self.root} is not empty and has no {MANIFEST}; refusing to write into it")
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(path, {"config": self.config, "config_hash": self.hash, "complete": False})

    def pending_shards(self) -> list[int]:
        """Shards without a sidecar (never finished); finished ones are verified and a corrupt one is named."""
        todo = []
        for j in range(self.num_shards):
            side = self.root / f"shard-{j:05d}.json"
            if side.exists():
                verify_shard(self.root, j, json.loads(side.read_text()))
            else:
                todo.append(j)
        return todo

    def write_shard(self, j: int) -> None:
        from safetensors.torch import save

        idx = list(self.shard_indices(j))
        prompts = [self.prompts[i % len(self.prompts)] for i in idx]
        z0 = pair_noise(self.seed, idx, self.shape)
        z1 = []
        for b in range(0, len(idx), self.batch_size):
            z1.append(self.teacher(z0[b:b + self.batch_size], prompts[b:b + self.batch_size], self.guidance_scale))
            test_hook(f"pairs:shard{j}:batch{b // self.batch_size}")
        z1 = torch.cat(z1)
        dt = STORAGE_DTYPES[self.storage_dtype]
        seeds = [pair_seed(self.seed, i) for i in idx]
        tensors = {"z0": z0.to(dt).contiguous(), "z1": z1.to(dt).contiguous(),
                   "index": torch.tensor(idx, dtype=torch.int64), "seed": torch.tensor(seeds, dtype=torch.int64)}
        data = save(tensors, metadata={"config_hash": self.hash})
        shard = self.root / f"shard-{j:05d}.safetensors"
        atomic_write_bytes(shard, data)
        test_hook(f"pairs:shard{j}:written")
        _atomic_write_json(self.root / f"shard-{j:05d}.json",
                           {"shard": j, "file": shard.name, "sha256": hashlib.sha256(data).hexdigest(),
                            "count": len(idx), "indices": [idx[0], idx[-1]], "seeds": seeds, "prompts": prompts,
                            "config_hash": self.hash})

    def run(self, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
        """Write this rank's missing shards (shard j belongs to rank j % world_size); rank 0 completes the manifest
        when every shard exists. Returns the manifest."""
        self._check_or_create_manifest()
        todo = [j for j in self.pending_shards() if j % world_size == rank]
        t0 = time.time()
        for n, j in enumerate(todo):
            self.write_shard(j)
            if progress:
                print(f"pairs: shard {j} written ({n + 1}/{len(todo)} this run, {time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
        manifest = json.loads((self.root / MANIFEST).read_text())
        if rank == 0 and not self.pending_shards():
            shards = [json.loads((self.root / f"shard-{j:05d}.json").read_text()) for j in range(self.num_shards)]
            manifest.update(complete=True, shards=[{k: s[k] for k in ("file", "sha256", "count")} for s in shards])
            _atomic_write_json(self.root / MANIFEST, manifest)
        return manifest


def verify_shard(root: Path, j: int, sidecar: dict) -> Path:
    """Check that shard `j` exists and its bytes match the SHA-256 of its sidecar; raise naming the file."""
    path = Path(root) / f"shard-{j:05d}.safetensors"
    if not path.exists():
        raise PairsError(f"pair shard {path} is missing but its sidecar {path.with_suffix('.json').name} exists")
    if sha256_file(path) != sidecar["sha256"]:
        raise PairsError(f"pair shard {path} is corrupt or truncated (SHA-256 differs from {path.stem}.json); "
                         f"delete {path.name} and {path.stem}.json and rerun the pairs stage to regenerate it")
    return path


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise PairsError(f"{root} is not a pairs folder: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PairsError(f"{path} is corrupt ({exc})") from exc


@dataclass
class PairDataset(torch.utils.data.Dataset):
    """All pairs of a complete folder in memory (every shard verified): items are dict(z0, z1, prompt, seed, index).

    `z0`/`z1` are float32 tensors (N, C, H, W); `prompts` a list; `manifest` the folder's manifest."""

    z0: torch.Tensor
    z1: torch.Tensor
    prompts: list[str]
    seeds: torch.Tensor
    manifest: dict

    @classmethod
    def load(cls, root: str | Path) -> PairDataset:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(root)
        manifest = read_manifest(root)
        if not manifest.get("complete"):
            raise PairsError(f"pairs folder {root} is incomplete (an interrupted run?); rerun the pairs stage with "
                             "the same settings to finish it")
        z0, z1, prompts, seeds = [], [], [], []
        for j, entry in enumerate(manifest["shards"]):
            side_path = root / f"shard-{j:05d}.json"
            if not side_path.exists():
                raise PairsError(f"sidecar {side_path} of a complete pairs folder is missing")
            side = json.loads(side_path.read_text())
            if side["sha256"] != entry["sha256"]:
                raise PairsError(f"sidecar {side_path} does not match {MANIFEST}")
            path = verify_shard(root, j, side)
            try:
                t = load_file(str(path))
            except (SafetensorError, OSError) as exc:  # pragma: no cover - the hash check catches this first
                raise PairsError(f"pair shard {path} cannot be read ({exc})") from exc
            z0.append(t["z0"].float())
            z1.append(t["z1"].float())
            seeds.append(t["seed"])
            prompts += side["prompts"]
        return cls(torch.cat(z0), torch.cat(z1), prompts, torch.cat(seeds), manifest)

    def __len__(self) -> int:
        return self.z0.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"z0": self.z0[i], "z1": self.z1[i], "prompt": self.prompts[i], "seed": int(self.seeds[i]), "index": i}

    @property
    def config_hash(self) -> str:
        return self.manifest["config_hash"]
