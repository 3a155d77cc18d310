"""Copy a trained distillation output into the zoo: float16 safetensors, no machine paths, card.json + README.md.

    python -m diffaccel.distill.export runs/onestep digits-sd-onestep --chain runs/pairs-sd runs/2rf \
        runs/pairs-2rf runs/onestep [--quality benchmarks/results/distill.json]
    python -m diffaccel.distill.export runs/flux-onestep digits-flux-onestep --chain runs/pairs-flux \
        runs/flux-2rf runs/flux-onestep [--quality benchmarks/results/distill_flux.json]

The card records every stage of the chain: its exact command, seed, thread count and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.files import atomic_save


def _stage_record(folder: Path) -> dict:
    card = folder / "distill_card.json"
    if card.exists():
        c = json.loads(card.read_text())
        return {"stage": c["stage"], "command": c["command"], "seed": c["settings"]["seed"],
                "threads": c["settings"].get("threads"), "train_seconds": c["train_seconds"], "steps": c["steps"],
                "final_loss": c["final_loss"], "machine": c["machine"], "num_pairs": c["num_pairs"]}
    manifest = folder / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
        cfg = m["config"]
        return {"stage": "pairs", "command": run.get("command"), "seed": cfg["seed"],
                "threads": run.get("threads"), "wall_seconds": run.get("seconds"), "num_pairs": cfg["num_pairs"],
                "teacher": cfg["teacher"], "guidance_scale": cfg["guidance_scale"], "config_hash": m["config_hash"]}
    raise InputError(f"{folder} is neither a distill output (distill_card.json) nor a pairs folder")


def export(src: str | Path, name: str, chain: list[str], quality: dict | None = None,
           out_root: str | Path | None = None) -> Path:
    from ..zoo.paths import weights_dir
    from ..zoo.registry import record_digests
    from .teachers import load_pipeline

    src = Path(src)
    out_root = Path(out_root) if out_root else weights_dir()
    pipe = load_pipeline(str(src))  # a RectifiedFlowPipeline, or a FluxPipeline for a flow teacher's student
    kind = type(pipe).__name__

    def write(tmp: Path) -> None:
        pipe.to(torch.float16).save_pretrained(tmp)
        for cfg_file in tmp.rglob("*.json"):  # from_pretrained records where a component came from: not ours to ship
            cfg = json.loads(cfg_file.read_text())
            if isinstance(cfg, dict) and {cfg.pop("_name_or_path", None), cfg.pop("name_or_path", None)} != {None}:
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        stages = [_stage_record(Path(c)) for c in chain]
        teacher = next((s["teacher"]["teacher"] for s in stages if s["stage"] == "pairs"), "its teacher")
        n_params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                       for p in m.parameters())
        steps = json.loads((src / "distill_card.json").read_text()).get("distilled_steps") or 1
        card = {"name": name, "command": " && ".join(s["command"] or f"(stage {s['stage']})" for s in stages),
                "stages": stages, "train_seconds": round(sum(s.get("train_seconds") or s.get("wall_seconds") or 0
                                                              for s in stages), 1),
                "machine": stages[-1].get("machine", ""), "parameters": n_params, "pipeline": kind,
                "distilled_steps": steps, "quality": quality or {}}
        (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
        lines = [f"# {name}", "", f"Part of the diffaccel model zoo: made from `{teacher}` by the distillation chain "
                 "below (diffaccel.distill; InstaFlow-style reflow then one-step distillation). Weights: safetensors "
                 "stored as float16, loaded as float32. Load with `diffaccel.zoo.load(\"" + name + "\")` "
                 f"(a `{kind}`) and call it with `num_inference_steps={steps}`, without classifier-free guidance.",
                 "", f"- parameters (all components): {n_params:,}", ""]
        for s in stages:
            secs = s.get("train_seconds") or s.get("wall_seconds")
            lines.append(f"- {s['stage']}: `{s['command']}` (seed {s['seed']}, threads {s['threads']}, "
                         f"{secs} s wall" + (f", {s['steps']} steps, final loss {s['final_loss']:.4f}" if "steps" in s
                                              else f", {s['num_pairs']} pairs") + ")")
        if quality:
            lines += ["", f"- quality: `{json.dumps(quality)}`"]
        (tmp / "README.md").write_text("\n".join(lines) + "\n")

    path = atomic_save(out_root / name, write, directory=True)
    record_digests(path)  # the card records every file's SHA-256; `zoo.load` verifies them
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("name")
    p.add_argument("--chain", nargs="+", required=True, help="the folders of every stage, in order")
    p.add_argument("--quality", default=None, help="a JSON file whose content goes into the card")
    p.add_argument("--out-root", default=None)
    a = p.parse_args(argv)
    quality = json.loads(Path(a.quality).read_text()) if a.quality else None
    print(export(a.src, a.name, a.chain, quality, a.out_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
