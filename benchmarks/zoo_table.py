"""Print the README's zoo table from the model cards written by `diffaccel zoo train` (no numbers typed by hand).

    python benchmarks/zoo_table.py
"""

from __future__ import annotations

import json
import math

from diffaccel.zoo import ENTRIES, entry_path
from safetensors import safe_open


def _params(path) -> int:
    n = 0
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            n += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return n


def main() -> None:
    print("| name | returns | parameters (folder) | size | training (command, wall time) | quality |")
    print("|---|---|---|---|---|---|")
    for name, e in ENTRIES.items():
        if not e.trained:
            continue
        path = entry_path(name)
        card = json.loads((path / "card.json").read_text())
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        m, q = card["train_metrics"], card.get("quality")
        if q and "accuracy" in q:
            qual = f"prompted-class accuracy {q['accuracy']:.1%} (n={q['n']})"
        elif q:
            qual = (f"mean top-class prob {q['mean_top_prob']:.3f}, smallest class share {q['min_class_share']:.1%} "
                    f"(n={q['n']})")
        elif "test_accuracy" in m:
            qual = f"test accuracy {m['test_accuracy']:.1%} (360 images)"
        elif "recon_test_accuracy" in m:
            qual = f"reconstructions classified correctly {m['recon_test_accuracy']:.1%}, MSE {m['recon_test_mse']:.4f}"
        elif "zero_shot_test_accuracy" in m:
            qual = f"zero-shot test accuracy {m['zero_shot_test_accuracy']:.1%}"
        else:
            qual = ""
        print(f"| `{name}` | `{e.kind}` | {_params(path):,} | {size:.1f} MB | `{card['command']}`, "
              f"{card['train_seconds'] / 60:.1f} min ({card['settings']['iterations']} it) | {qual} |")


if __name__ == "__main__":
    main()
