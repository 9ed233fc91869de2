"""The seed's Table 1 in miniature on the toy world: which component to finetune.

    python bench/toy_components.py [--iters 120] [--eval-images 20] [--out-dir bench/results]
                                   [--variants prefix,text_lora,unet_lora,text_unet_lora] [--images-per-prompt N]

Each ``finetune.target`` is trained in its own subprocess on the toy gender config (fastfair/toy/configs/
gender.yaml) with the same iterations, seed, prompts and noise, then evaluated on the held-out occupations as
the demo does (bench/_toy.py): gender bias before/after by the toy evaluation classifier, semantics
(sim_latent, sim_layout: cosine to the original image from the same noise), image diversity, seconds per
iteration and trainable parameters.

- ``prefix``: the config's 5 soft tokens; ``text_lora`` / ``unet_lora`` / ``text_unet_lora``: LoRA of the
  config's rank (8) on the text encoder, the U-Net attention projections, or both.
- One learning rate for every target (the config's): the seed trains every row of its Table 1 with the same
  AdamW learning rate (5e-5, seed 0121), so nothing is tuned per target here either.

Writes OUT_DIR/toy_components.json and toy_components.md. The defaults are sized for <= 30 min on the 2-core CPU
machine: 1.8 (prefix) to 2.8 (U-Net LoRA) s per iteration plus about 1 min of start-up and evaluation per target
(estimated from 2-iteration runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import (FINAL_WINDOW, add_common_args, base_spec, check_args, final_mean, heldout_row,  # noqa: E402
                  run_meta, run_worker, settings_line, train_and_evaluate, variant_rows, write_outputs)
from _workers import worker_or_none  # noqa: E402

TARGETS = ("prefix", "text_lora", "unet_lora", "text_unet_lora")


def worker(spec: dict) -> dict:
    return train_and_evaluate({**spec, "overrides": spec["overrides"] + [f"finetune.target={spec['name']}"]})


def markdown(results: list, meta: dict) -> str:
    first = heldout_row(results[0])
    lines = [settings_line(meta, f"every target with the adjusted gradient `{results[0]['coefficients']}`",
                           "target"), "",
             "| finetuned | trainable params | held-out gender bias ↓ | sim_latent ↑ | sim_layout ↑ | diversity "
             f"| final train loss (last {FINAL_WINDOW}) | s/iter |", "|---|" + "---:|" * 7,
             f"| original | — | {first['bias_before']:.3f} ± {first['bias_before_std']:.3f} | — | — | "
             f"{first['diversity_before']:.3f} | — | — |"]
    for r in results:
        h = heldout_row(r)
        lines.append(f"| {r['name']} | {r['trainable_parameters']:,} | {h['bias_after']:.3f} ± "
                     f"{h['bias_after_std']:.3f} | {h['sim_latent']:.3f} | {h['sim_layout']:.3f} | "
                     f"{h['diversity_after']:.3f} | {final_mean(r['history']):.4f} | "
                     f"{r['seconds_per_iteration']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Optional[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, iters=120, eval_images=20, variants=TARGETS)
    args = parser.parse_args(argv)
    if worker_or_none(args, worker):
        return None
    targets = check_args(args, TARGETS)
    work = Path(args.work_dir or "runs/toy_components")
    results = [run_worker(__file__, base_spec(args, target, work)) for target in targets]
    meta = run_meta(args, results[0])
    payload = {"meta": meta, "variants": variant_rows(results)}
    table = markdown(results, meta)
    write_outputs(args.out_dir, "toy_components", payload, table, argv)
    print(table)
    return payload


if __name__ == "__main__":
    main()
