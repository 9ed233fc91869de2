"""Peak memory of the decode-and-judge phase versus the images judged at once (``loss.judge_images``).

    python bench/judge_memory.py --images 1,2,4 --json bench/results/judge_memory_sd15_cpu.json
           [--model sd15|tiny] [--resolution PX] [--models-dir DIR]

The phase is bench/train_step.py's (``judged_loss``), after the sampler: the frozen model's latents decoded and
embedded without a graph, the finetuned latents decoded, judged (the face classifier on the centre crop, CLIP
ViT-H/14 and DINOv2 ViT-B/14 against the originals) and backpropagated to dL/dz_0, on SD 1.5 shapes with random
weights (bench/train_step.py's ``sd15`` models; --models-dir shares them with it; ``tiny``: the test-sized
world). Modes, each (mode, images) in a fresh subprocess:
- ``keep``: every activation kept for the backward (``loss.recompute_judges=false``; the baseline's way);
- ``blockwise``: the decoder block-wise and each judge rebuilt in the backward, the whole batch at once
  (``loss.recompute_judges=true``, the default);
- ``sliced``: the same one image at a time, each image's decoder rebuild block-wise (``loss.judge_images=1``).

peak_bytes: the phase's peak above the level after the models and a warm-up run of the phase
(``bench/_memory.py``: the CUDA allocator's peak, or the resident set on CPU, where every buffer is mapped on its
own); seconds: that measured run's, so on CPU slowed by the mapping alike for every mode (compare ratios).
Frozen weights in fp16 on CUDA, fp32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _memory import PeakMemory, peak_ratio, worker_env  # noqa: E402
from _workers import add_worker_flag, spawn, worker_or_none  # noqa: E402
from fastfair.run_control import sigterm_as_exit  # noqa: E402

MODES = ("keep", "blockwise", "sliced")


def worker(mode: str, images: int, latent: int, paths: dict) -> dict:
    import torch

    from train_step import frozen_dtype, judged_loss, load_objective, recompute_objective

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    objective = load_objective(paths, device, frozen_dtype("auto", device))
    if mode != "keep":
        recompute_objective(objective, 1 if mode == "sliced" else None)
    g = torch.Generator().manual_seed(0)
    z_orig, z = torch.randn((2, images, 4, latent, latent), generator=g).to(device)
    judged_loss(objective, z_orig, z)  # warm-up: lazily allocated buffers, kernels
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    loss, grad = judged_loss(objective, z_orig, z)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"mode": mode, "images": images, "latent": latent, "device": device,
              "peak_bytes": memory.peak(), "seconds": seconds, "loss": float(loss),
              "grad_norm": float(grad.double().norm())}
    if device == "cuda":
        result["device_name"] = torch.cuda.get_device_name(0)
    return result


def markdown(results: list) -> str:
    """Peak (MiB) and seconds per image of each mode per image count, and the ratios to ``keep``."""
    by = {(r["mode"], r["images"]): r for r in results}
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    head = ["images"] + [f"{m} peak MiB" for m in modes] + [f"{m} / keep" for m in modes if m != "keep"] + \
        [f"{m} s/image" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in sorted({r["images"] for r in results}):
        row = [str(n)]
        row += [f"{by[(m, n)]['peak_bytes'] / 2**20:.1f}" if (m, n) in by else "-" for m in modes]
        keep = by.get(("keep", n))
        row += [peak_ratio(by[(m, n)]["peak_bytes"], keep["peak_bytes"] if keep else None) if (m, n) in by else "-"
                for m in modes if m != "keep"]
        row += [f"{by[(m, n)]['seconds'] / n:.2f}" if (m, n) in by else "-" for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    spread = max(abs(r["grad_norm"] / by[(results[0]["mode"], r["images"])]["grad_norm"] - 1) for r in results)
    lines.append("")
    lines.append(f"The same gradient in every mode: |dL/dz_0| differs by at most {spread:.1e} (relative) between modes "
                 "at each image count.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=("sd15", "tiny"))
    parser.add_argument("--images", default="1,2,4", help="images judged per run, e.g. 1,2,4")
    parser.add_argument("--modes", default=",".join(MODES), help=f"from {', '.join(MODES)}")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (sd15: default 512 on CUDA, 256 on CPU; tiny: 16)")
    parser.add_argument("--models-dir", default=None, help="reuse/keep the saved sd15 models here")
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if worker_or_none(args, lambda spec: worker(**spec)):
        return
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    try:
        counts = [int(n) for n in args.images.split(",") if n]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"--images {args.images!r}: positive image counts, e.g. 1,2,4")
    import torch

    from train_step import models_on_disk

    resolution = args.resolution or (16 if args.model == "tiny" else 512 if torch.cuda.is_available() else 256)
    factor = 2 if args.model == "tiny" else 8  # the VAE's
    if resolution % factor:
        parser.error(f"--resolution {resolution}: a multiple of {factor} (the {args.model} VAE's factor)")
    tmp = tempfile.TemporaryDirectory(prefix="fastfair-bench-") if args.models_dir is None else None
    # the U-Net's sample size is the only resolution-dependent part saved, and this phase does not use it
    paths = models_on_disk(args.model, Path(args.models_dir or tmp.name), resolution)
    env = worker_env() if not torch.cuda.is_available() else dict(os.environ)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    results = []
    for n in counts:
        for mode in modes:
            cfg = {"mode": mode, "images": n, "latent": resolution // factor, "paths": paths}
            results.append(spawn(__file__, cfg, f"{mode} at {n} images", env))
            r = results[-1]
            print(f"{mode:9s} images={n:3d} peak={r['peak_bytes'] / 2**20:9.1f} MiB  {r['seconds']:7.2f} s",
                  flush=True)
            if args.json:  # after every run: a time limit keeps what finished
                write_report(results, args, argv, resolution)
    print(markdown(results))


def write_report(results: list, args, argv, resolution: int) -> None:
    """The JSON and Markdown files of the runs so far, each replaced whole (a run stopped mid-write keeps the
    last report)."""
    from fastfair.files import write_text

    meta = {"device": results[0]["device"], "device_name": results[0].get("device_name"), "model": args.model,
            "resolution": resolution, "date": time.strftime("%Y-%m-%d")}
    command = " ".join(shlex.quote(a) for a in ["python", "bench/judge_memory.py", *(argv or sys.argv[1:])])
    name = meta["device_name"] or meta["device"]
    for path, text in ((args.json, json.dumps({**meta, "results": results}, indent=1)),
                       (os.path.splitext(args.json)[0] + ".md",
                        f"Command: `{command}`\n\nDevice: {name}; model {args.model} at {resolution}x{resolution} "
                        f"pixels; {meta['date']}.\n\n{markdown(results)}\n")):
        write_text(path, text)


if __name__ == "__main__":
    with sigterm_as_exit():  # gpu_check.sh's time limit: the model folder in /tmp and a stopped write are removed
        main()
