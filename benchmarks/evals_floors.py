"""Real-vs-real reference floors of the harness metrics (domain: digits-features) on the zoo digits.

FID is biased upwards at small n (Bińkowski et al. 2018; Chong & Forsyth 2020), so the floor that matters for a
benchmark row is the one at the row's own sample counts: N real training images vs the 360-image test split, the
same n_a / n_b as `diffaccel bench -n N`. Also prints the full train (1437) vs test (360) value and the CLIP score and
classifier accuracy of the real test images with their captions.

    python benchmarks/evals_floors.py --n 200 --repeats 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[200], help="real sample counts to evaluate (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="disjoint-seed train subsets per n (mean and std)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffaccel.evals import (
        DigitsExtractor,
        FeatureStats,
        ReferenceStats,
        clip_score,
        features_from_images,
        fid_from_stats,
        kid,
    )
    from diffaccel.evals.harness import reference_features, reference_images
    from diffaccel.zoo import caption, load_split

    ext = DigitsExtractor()
    test = reference_features(ext, "test")
    train = features_from_images(ext, reference_images("train"), source="zoo digits train split")
    rows = []

    def row(name: str, fids: list[float], kids: list[float], n_a: int) -> None:
        rows.append({"comparison": name, "n_a": n_a, "n_b": test.stats.n, "fid_mean": float(np.mean(fids)),
                     "fid_std": float(np.std(fids)), "kid_mean": float(np.mean(kids)), "kid_std": float(np.std(kids)),
                     "repeats": len(fids)})

    full_kid = kid(train.stats.features, test.stats.features, subset_size=test.stats.n, seed=0).mean
    row("train (all) vs test", [fid_from_stats(train.reference(), test.reference())], [full_kid], train.stats.n)
    feats = train.stats.features
    for n in args.n:
        fids, kids = [], []
        for seed in range(args.repeats):
            idx = np.random.default_rng(seed).choice(len(feats), n, replace=False)
            sub = FeatureStats(keep_features=True)
            sub.update(feats[idx])
            ref = ReferenceStats.from_features(sub, ext.describe())
            fids.append(fid_from_stats(ref, test.reference()))
            kids.append(kid(feats[idx], test.stats.features, subset_size=min(n, test.stats.n), seed=seed).mean)
        row(f"train subset n={n} vs test", fids, kids, n)

    labels = load_split("test").labels.tolist()
    real_clip = clip_score(reference_images("test"), [caption(y) for y in labels]).score
    acc = float((ext.logits(reference_images("test")).argmax(1).numpy() == np.asarray(labels)).mean())
    extra = {"test_clip_score": real_clip, "test_class_accuracy": acc, **ext.describe()}
    if args.json:
        print(json.dumps({"rows": rows, **extra}))
        return 0
    print(f"{'comparison':32s} {'n_a':>5s} {'n_b':>5s} {'FID':>15s} {'KID x1e3':>15s}")
    for r in rows:
        print(f"{r['comparison']:32s} {r['n_a']:5d} {r['n_b']:5d} {r['fid_mean']:8.3f} ±{r['fid_std']:5.3f} "
              f"{r['kid_mean'] * 1e3:8.2f} ±{r['kid_std'] * 1e3:5.2f}")
    print(f"real test split: CLIP score {real_clip:.2f} (clip:digits-clip), classifier accuracy {acc:.1%}")
    print(f"features: {extra['extractor']} (d={extra['dims']}, resize={extra['resize']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
