"""Cost of verifying the zoo's recorded SHA-256 digests, as a share of the load time of each trained entry.

    python benchmarks/zoo_integrity.py --repeats 5 --threads 1

For every trained entry: the median time of `zoo.load(name)` (which includes the verification and the finite-
parameter check) and the median time of the two checks alone, in the same run; prints the ratio per entry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: file cache, imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from diffaccel import zoo
    from diffaccel.core.weights import check_finite_parameters, verify_digests
    from diffaccel.zoo.registry import ENTRIES, card_digests, entry_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, entry in ENTRIES.items():
        if not entry.trained or not entry_path(name).is_dir():
            continue
        path, digests = entry_path(name), card_digests(entry_path(name))
        loaded = zoo.load(name)
        load_s = median_seconds(lambda name=name: zoo.load(name), args.repeats)
        verify_s = median_seconds(lambda path=path, digests=digests: verify_digests(path, digests, fix=""),
                                  args.repeats)
        finite_s = median_seconds(lambda loaded=loaded: check_finite_parameters(loaded, fix="", what=""),
                                  args.repeats)
        size = sum((path / f).stat().st_size for f in digests) / 2**20
        rows.append({"entry": name, "files": len(digests), "mib": round(size, 2), "load_s": round(load_s, 4),
                     "sha256_s": round(verify_s, 4), "finite_s": round(finite_s, 4),
                     "share_of_load": round((verify_s + finite_s) / load_s, 4)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'entry':18s} {'files':>5s} {'MiB':>6s} {'load s':>8s} {'sha256 s':>9s} {'finite s':>9s} {'share':>7s}")
        for r in rows:
            print(f"{r['entry']:18s} {r['files']:5d} {r['mib']:6.2f} {r['load_s']:8.4f} {r['sha256_s']:9.4f} "
                  f"{r['finite_s']:9.4f} {r['share_of_load']:7.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
