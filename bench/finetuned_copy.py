"""What an evaluation spends building its finetuned model on the base model it holds (``fastfair.evaluate``,
and once per checkpoint in ``fastfair.select_checkpoint``'s sweep), per finetuning target, two ways side by side:

- ``parts``: copies of the parts the finetuned model changes, the others shared with the held base model
  (``fastfair.evaluation.sources``, since 2026-12-02);
- ``whole``: a copy of the whole base model, and for ``unet_full`` also the training-time frozen U-Net copy and
  float32 trainable weights (the earlier way, reproduced here by patching those two points).

    python bench/finetuned_copy.py [--model sd15|tiny] [--targets text_lora,unet_lora,unet_full] [--dtype fp32]
                                   [--models-dir DIR] [--json OUT.json]

On CPU, each (target, way) in its own subprocess (``bench/_memory.py``'s worker_env): it loads the base model as a
sweep holds it (``fastfair.evaluation.shared.SharedLoads``), then times ``load_sources`` building the finetuned
model from a training checkpoint of that target (LoRA rank 50 on SD 1.5 shapes with random weights: bench/
train_step.py's ``sd15`` models; ``tiny``: the test-sized world). Reported: the peak memory above the held base
model (the checkpoint's tensors, read in both ways, included: the pages of its file mapping count once read;
the held base's weights are read before the measurement, as sampling the base images reads them) and the
seconds, with ratios parts / whole.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakMemory, peak_ratio, worker_env  # noqa: E402
from _workers import add_worker_flag, spawn, worker_or_none  # noqa: E402

WAYS = ("whole", "parts")
TARGETS = ("text_lora", "unet_lora", "text_unet_lora", "unet_full")


@contextlib.contextmanager
def _the_earlier_way():
    """Inside: fastfair.evaluation.sources back to copying the whole base model and fastfair.finetune's model to its
    training-time build (the frozen U-Net copy, float32 trainable weights), as evaluations did before."""
    import fastfair.evaluation.sources as sources
    import fastfair.finetune as finetune

    copy_parts, model = sources._copy_parts, finetune.FinetunedModel

    class TrainingBuild(model):
        def __init__(self, *args, training=True, **kwargs):
            super().__init__(*args, training=True, **kwargs)

    sources._copy_parts = lambda base, changed: copy_parts(base, ("tokenizer", "text_encoder", "unet", "vae"))
    finetune.FinetunedModel = TrainingBuild
    try:
        yield
    finally:
        sources._copy_parts, finetune.FinetunedModel = copy_parts, model


def worker(way: str, sd: str, checkpoint: str, dtype: str) -> dict:
    with _the_earlier_way() if way == "whole" else contextlib.nullcontext():
        return _measure(way, sd, checkpoint, dtype)


def _measure(way: str, sd: str, checkpoint: str, dtype: str) -> dict:
    import torch

    from fastfair.evaluation.shared import SharedLoads
    from fastfair.evaluation.sources import load_sources

    shared = SharedLoads()
    _, _, held = load_sources(sd, dtype=dtype, shared=shared)  # the base model, held as a sweep holds it
    base_bytes = sum(t.numel() * t.element_size() for t in held["base"].unet.parameters())
    # read every weight once, as sampling the base images does before a sweep builds a finetuned model: weights
    # loaded from a file mapping are resident only when read, and a copy would otherwise count its source too
    (_, base), = shared._held.values()  # the held base model: the one thing it holds
    for module in (base.text_encoder, base.unet, base.vae):
        for tensor in module.state_dict().values():
            tensor.sum()
    memory = PeakMemory("cpu")
    memory.start()
    start = time.perf_counter()
    _, _, models = load_sources(sd, checkpoint, dtype=dtype, shared=shared)
    seconds = time.perf_counter() - start
    peak = memory.peak()
    with torch.no_grad():  # the same model both ways (a check; not timed): how far it moved the embedding
        prompt = "a photo of the face of a nurse"
        shift = models["finetuned"].embeddings(prompt)[0] - models["base"].embeddings(prompt)[0]
    return {"way": way, "dtype": dtype, "peak_bytes": peak, "seconds": seconds, "base_unet_bytes": base_bytes,
            "embedding_shift": float(shift.double().norm()),
            "shares_unet": models["finetuned"].unet is held["base"].unet,
            "device": f"cpu ({torch.get_num_threads()} threads)"}


def markdown(results: list) -> str:
    rows = ["| target | way | peak above the held base (MiB) | seconds | memory parts / whole | time parts / whole |",
            "|---|---|---|---|---|---|"]
    for target in dict.fromkeys(r["target"] for r in results):
        mine = {r["way"]: r for r in results if r["target"] == target}
        for way in WAYS:
            if way not in mine:
                continue
            r, whole = mine[way], mine.get("whole")
            ratios = ("-", "-") if way == "whole" or whole is None else (
                peak_ratio(r['peak_bytes'], whole['peak_bytes']), f"{r['seconds'] / whole['seconds']:.2f}")
            rows.append(f"| {target} | {way} | {r['peak_bytes'] / 2**20:.1f} | {r['seconds']:.2f} | "
                        f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--targets", default="text_lora,unet_lora,unet_full", help=f"from {', '.join(TARGETS)}")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="the evaluation's dtype")
    parser.add_argument("--models-dir", default=None, help="reuse/keep the saved sd15 models here")
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if worker_or_none(args, lambda spec: worker(**spec)):
        return
    targets = [t for t in args.targets.split(",") if t]
    if not targets or set(targets) - set(TARGETS):
        parser.error(f"--targets {args.targets!r}: choose from {', '.join(TARGETS)}")
    from sweep_loads import save_run
    from train_step import models_on_disk

    tmp = tempfile.TemporaryDirectory(prefix="fastfair-bench-")
    files = models_on_disk(args.model, Path(args.models_dir or tmp.name), 128 if args.model == "sd15" else 16)
    files = dict(files, clip_vision=files["clip"])
    results = []
    for target in targets:
        print(f"{target}: writing a checkpoint", flush=True)
        run = save_run(Path(tmp.name) / f"run_{target}", files, 50 if args.model == "sd15" else 4, [1], target)
        checkpoint = next((run / "checkpoints").iterdir())
        for way in WAYS:
            cfg = {"way": way, "sd": files["sd"], "checkpoint": str(checkpoint), "dtype": args.dtype}
            results.append({"target": target, **spawn(__file__, cfg, f"{target} {way}", worker_env())})
            r = results[-1]
            print(f"{target:14s} {way:5s} peak={r['peak_bytes'] / 2**20:9.1f} MiB  {r['seconds']:6.2f} s", flush=True)
        for folder in (run / "checkpoints").iterdir():  # unet_full's are two U-Nets' worth of disk
            for file in folder.iterdir():
                file.unlink()
    table = markdown(results)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"device": results[0]["device"], "model": args.model, "dtype": args.dtype,
                "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)
        command = " ".join(shlex.quote(a) for a in ["python", "bench/finetuned_copy.py", *(argv or sys.argv[1:])])
        unet = results[0]["base_unet_bytes"] / 2**20
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"Command: `{command}`\n\n{meta['device']}; model {args.model} ({args.dtype}; its U-Net "
                    f"{unet:.0f} MiB); {meta['date']}.\n\n{table}\n")


if __name__ == "__main__":
    main()
