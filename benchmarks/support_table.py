"""Print the README's model-support table: for each pipeline family and method, ✔ or the reason it is refused.

    python benchmarks/support_table.py

Every cell is what `diffaccel.check(pipe, *parse_recipe(recipe))` answers on the zoo's tiny random pipeline of that
family (no numbers or reasons typed by hand). HarmoniCa rows use an all-compute FORA-shaped plan made for the model.
"""

from __future__ import annotations

import sys

from diffaccel import CompositionError, parse_recipe
from diffaccel.protocol import check
from diffaccel.zoo import load

FAMILIES = [("SD 1.x", "random-sd"), ("SDXL", "random-sdxl"), ("SD3", "random-sd3"), ("Flux", "random-flux"),
            ("DiT", "random-dit"), ("PixArt-α", "random-pixart"), ("DDPM (pixel UNet)", "random-ddpm")]
METHODS = [("S-PNDM / F-PNDM", "s-pndm@10"), ("Time-Shift", "s-pndm@10 + time-shift"),
           ("DPM-Solver++ swap", "dpm++2m@10"), ("encoder propagation", "ddim@10 + ep:uniform-3"),
           ("FORA / HarmoniCa units", "ddim@10 + fora:2"), ("FK steering", "ddim@10 + fk:4"),
           ("best-of-N", "ddim@10 + best-of-n:4"), ("patch parallel", "pp:displaced"), ("one-step", "one-step")]


def cell(pipe, recipe: str) -> str:
    try:
        check(pipe, *parse_recipe(recipe))
    except (CompositionError, ValueError, TypeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split()).split("; ")[0].replace("|", "/")
        return "✘ " + (reason if len(reason) <= 110 else reason[:107] + "...")
    return "✔"


def main() -> int:
    print("| method (recipe) | " + " | ".join(f for f, _ in FAMILIES) + " |")
    print("|---|" + "---|" * len(FAMILIES))
    pipes = {name: load(name) for _, name in FAMILIES}
    for label, recipe in METHODS:
        cells = [cell(pipes[name], recipe) for _, name in FAMILIES]
        print(f"| {label} (`{recipe}`) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
