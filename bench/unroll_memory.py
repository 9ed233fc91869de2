"""Peak memory of one DFT backward versus the number of sampling steps: fastfair vs the literal reference.

    python bench/unroll_memory.py --steps 5,10,20,40 --json bench/results/unroll_memory_cpu.json

Each (impl, steps) runs in a fresh subprocess. The model is a small Stable-Diffusion-shaped U-Net (SD's block
layout at reduced width) with its cross-attention trainable, CFG on, on CUDA when present, else CPU.

peak_bytes is the peak above the level reached after the model, inputs and one warm-up forward are in memory:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: the process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs) minus its resident set before the run. The worker sets glibc's mmap threshold to
  64 KiB (MALLOC_MMAP_THRESHOLD_) so every tensor buffer is its own mapping, returned to the OS when freed:
  the resident set then follows the live tensors, and repeated runs agree to about a percent.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


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
    fn = sample if impl == "fastfair" else reference_sample
    with torch.no_grad():  # warm-up: lazily allocated buffers, kernels
        fn(unet, tiny_scheduler(), z_T, cond, uncond, num_steps=2)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    z0 = fn(unet, tiny_scheduler(), z_T, cond, uncond, num_steps=steps)
    z0.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"impl": impl, "steps": steps, "peak_bytes": int(peak), "seconds": time.perf_counter() - start,
            "device": device, "latent": [batch, 4, size, size]}


def markdown(results) -> str:
    by = {(r["impl"], r["steps"]): r["peak_bytes"] for r in results}
    steps = sorted({r["steps"] for r in results})
    lines = ["| steps | fastfair peak (MiB) | reference peak (MiB) | fastfair / reference |", "|---:|---:|---:|---:|"]
    for s in steps:
        a, b = by.get(("fastfair", s)), by.get(("reference", s))
        lines.append(f"| {s} | {a / 2**20:.1f} | {b / 2**20:.1f} | {a / b:.3f} |")
    first, last = steps[0], steps[-1]
    lines.append("")
    lines.append(f"fastfair {last} steps / {first} steps: {by[('fastfair', last)] / by[('fastfair', first)]:.3f}; "
                 f"reference: {by[('reference', last)] / by[('reference', first)]:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="5,10,20,40")
    parser.add_argument("--impls", default="fastfair,reference")
    parser.add_argument("--size", type=int, default=32, help="latent height/width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size, args.batch)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = []
    for impl in args.impls.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", impl, str(steps), "--size", str(args.size),
                 "--batch", str(args.batch)], env=env, check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{impl:9s} steps={steps:3d} peak={results[-1]['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    table = markdown(results)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": results[0]["device"], "results": results}, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(f"Command: `python bench/unroll_memory.py --steps {args.steps} --json {args.json}`\n\n{table}\n")


if __name__ == "__main__":
    main()
