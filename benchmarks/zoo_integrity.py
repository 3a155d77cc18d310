"""Cost of verifying the zoo's recorded SHA-256 digests, as a share of the load time of each trained entry.

    python benchmarks/zoo_integrity.py --repeats 7 --threads 1

For every trained entry, interleaved in one run: the median time of `zoo.load(name)` (SHA-256 of every file,
hashed beside the loading, then the finite-parameter check), of the same load without any check
(`registry.load_from`), and of each check alone. `overhead` = checked / unchecked load time - 1 with every file
hashed (as in a fresh process); `warm` = the same for a repeated load (files unchanged since hashed are not read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, calls interleaved (a, b, a, b, ...) so machine noise hits both alike."""
    for fn in fns.values():
        fn()  # warm-up: file cache, imports
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    from diffaccel import zoo
    from diffaccel.core.weights import _VERIFIED, check_finite_parameters, verify_digests
    from diffaccel.zoo.registry import ENTRIES, card_digests, entry_path, load_from

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu, f32 = torch.device("cpu"), torch.float32
    rows = []
    for name, entry in ENTRIES.items():
        if not entry.trained or not entry_path(name).is_dir():
            continue
        path, digests = entry_path(name), card_digests(entry_path(name))
        loaded = zoo.load(name)
        def cold(name=name):
            _VERIFIED.clear()  # as in a fresh process: every file is hashed
            return zoo.load(name)

        t = interleaved_medians({
            "load": cold,  # checked: digests hashed beside loading, then finite parameters
            "warm": lambda name=name: zoo.load(name),  # files unchanged since hashed in this process: not re-read
            "unchecked": lambda name=name, path=path: load_from(name, path, cpu, f32),
            "sha256": lambda path=path, digests=digests: (_VERIFIED.clear(), verify_digests(path, digests, fix="")),
            "finite": lambda loaded=loaded: check_finite_parameters(loaded, fix="", what=""),
        }, args.repeats)
        size = sum((path / f).stat().st_size for f in digests) / 2**20
        rows.append({"entry": name, "files": len(digests), "mib": round(size, 2),
                     **{f"{k}_s": round(v, 4) for k, v in t.items()},
                     "overhead": round(t["load"] / t["unchecked"] - 1, 4),
                     "warm_overhead": round(t["warm"] / t["unchecked"] - 1, 4)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'entry':18s} {'files':>5s} {'MiB':>6s} {'load s':>8s} {'unchecked':>9s} {'sha256 s':>9s} "
              f"{'finite s':>9s} {'overhead':>8s} {'warm':>8s}")
        for r in rows:
            print(f"{r['entry']:18s} {r['files']:5d} {r['mib']:6.2f} {r['load_s']:8.4f} {r['unchecked_s']:9.4f} "
                  f"{r['sha256_s']:9.4f} {r['finite_s']:9.4f} {r['overhead']:8.2%} {r['warm_overhead']:8.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
