"""Peak memory of one DFT backward versus the number of sampling steps: fastfair vs the literal reference; and
versus the images in the batch: fastfair's recompute of the whole batch per U-Net call vs one image per call
(``recompute_images=1``, impl ``fastfair_per_image``).

    python bench/unroll_memory.py --steps 5,10,20,40 --json bench/results/unroll_memory_cpu.json
    python bench/unroll_memory.py --steps '' --batches 1,2,4,8,16 --json bench/results/unroll_memory_images_cpu.json

Each (impl, steps, batch) runs in a fresh subprocess. The model is a small Stable-Diffusion-shaped U-Net (SD's block
layout at reduced width) with its cross-attention trainable, CFG on, on CUDA when present, else CPU.

peak_bytes is the peak above the level reached after the model, inputs and one warm-up forward are in memory,
measured by ``bench/_memory.py`` (CUDA allocator peak; on CPU the peak resident set).
"""
import argparse
import functools
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import PeakMemory, peak_ratio, worker_env  # noqa: E402
from _workers import add_worker_flag, spawn, worker_or_none  # noqa: E402

IMPLS = ("fastfair", "fastfair_per_image", "reference")


def worker(impl: str, steps: int, size: int, batch: int) -> dict:
    import torch

    from fastfair.dft import sample
    from fastfair.reference import reference_sample
    from fastfair.testing import tiny_scheduler, tiny_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    unet = tiny_unet(channels=(32, 64, 64), cross_attention_dim=64, sample_size=size).to(device)
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        if "attn2" in name:
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(batch, 4, size, size, generator=g).to(device)
    cond = torch.randn(batch, 8, 64, generator=g).to(device)
    uncond = torch.randn(1, 8, 64, generator=g).to(device)
    fn = {"fastfair": sample, "fastfair_per_image": functools.partial(sample, recompute_images=1),
          "reference": reference_sample}[impl]
    with torch.no_grad():  # warm-up: lazily allocated buffers, kernels
        fn(unet, tiny_scheduler(), z_T, cond, uncond, num_steps=2)

    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    z0 = fn(unet, tiny_scheduler(), z_T, cond, uncond, num_steps=steps)
    z0.square().mean().backward()
    peak = memory.peak()
    return {"impl": impl, "steps": steps, "peak_bytes": peak, "seconds": time.perf_counter() - start,
            "device": device, "latent": [batch, 4, size, size], "images": batch}


def markdown_images(results) -> str:
    """The versus-images table: peak and seconds per image of each recompute, and their ratios."""
    by = {(r["impl"], r["images"]): r for r in results}
    lines = ["| images | whole-batch recompute peak (MiB) | per-image recompute peak (MiB) | per-image / whole | "
             "s per image, whole | s per image, per-image |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r["images"] for r in results}):
        a, b = by[("fastfair", n)], by[("fastfair_per_image", n)]
        lines.append(f"| {n} | {a['peak_bytes'] / 2**20:.1f} | {b['peak_bytes'] / 2**20:.1f} | "
                     f"{peak_ratio(b['peak_bytes'], a['peak_bytes'])} | {a['seconds'] / n:.3f} | "
                     f"{b['seconds'] / n:.3f} |")
    return "\n".join(lines)


def markdown(results) -> str:
    """The versus-steps table; an implementation left out (--impls) shows as '-'."""
    by = {(r["impl"], r["steps"]): r["peak_bytes"] for r in results}
    steps = sorted({r["steps"] for r in results})

    def mib(value):
        return "-" if value is None else f"{value / 2**20:.1f}"

    lines = ["| steps | fastfair peak (MiB) | reference peak (MiB) | fastfair / reference |", "|---:|---:|---:|---:|"]
    for s in steps:
        a, b = by.get(("fastfair", s)), by.get(("reference", s))
        lines.append(f"| {s} | {mib(a)} | {mib(b)} | {peak_ratio(a, b)} |")
    first, last = steps[0], steps[-1]
    lines.append("")
    growth = {impl: peak_ratio(by.get((impl, last)), by.get((impl, first))) for impl in ("fastfair", "reference")}
    lines.append(f"fastfair {last} steps / {first} steps: {growth['fastfair']}; reference: {growth['reference']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="5,10,20,40")
    parser.add_argument("--impls", default="fastfair,reference")
    parser.add_argument("--size", type=int, default=32, help="latent height/width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", default="", help="e.g. 1,2,4,8,16: fastfair's peak versus the images, whole-batch "
                        "and per-image recompute, at --batch-steps steps")
    parser.add_argument("--batch-steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if worker_or_none(args, lambda spec: worker(**spec)):
        return
    try:
        counts = [int(n) for text in (args.steps, args.batches) for n in text.split(",") if n]
    except ValueError:
        counts = [0]
    if not args.steps.strip(",") and not args.batches.strip(",") or min(counts, default=1) < 1:
        parser.error(f"--steps {args.steps!r} / --batches {args.batches!r}: comma-separated counts >= 1 (at least "
                     "one of them)")
    impls = [impl for impl in args.impls.split(",") if impl]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:  # checked first: a KeyError after the known ones' workers lost their results
        parser.error(f"--impls {args.impls!r}: unknown {', '.join(unknown)} (choose from {', '.join(IMPLS)})")
    env = worker_env()

    def run(impl: str, steps: int, batch: int) -> dict:
        spec = {"impl": impl, "steps": steps, "size": args.size, "batch": batch}
        result = spawn(__file__, spec, f"{impl} at {steps} steps, {batch} images", env)
        print(f"{impl:18s} steps={steps:3d} images={batch:3d} peak={result['peak_bytes'] / 2**20:8.1f} MiB",
              flush=True)
        return result

    steps_sweep = [run(impl, int(s), args.batch) for impl in impls for s in args.steps.split(",") if s]
    images_sweep = [run(impl, args.batch_steps, int(n)) for impl in ("fastfair", "fastfair_per_image")
                    for n in args.batches.split(",") if n]
    tables = ([markdown(steps_sweep)] if steps_sweep else []) + ([markdown_images(images_sweep)] if images_sweep
                                                                   else [])
    print("\n\n".join(tables))
    if args.json:
        results = steps_sweep + images_sweep
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": results[0]["device"], "results": results}, f, indent=1)
        command = shlex.join(["python", "bench/unroll_memory.py", *(sys.argv[1:] if argv is None else argv)])
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"Command: `{command}`\n\n" + "\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
