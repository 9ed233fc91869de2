"""Benchmark of the fused kernels against the unfused PyTorch sequence (issue 8).

    python bench/kernels.py --json OUT.json [--device cpu|cuda] [--dtypes fp16,fp32] [--quick] [--large]

For every available backend, side by side in one run: the forward step (CFG, order 2: reads z, eps_c, eps_u,
m_prev; writes z_next, m; trajectory fp32) and the backward fan-out (g fp32 -> 4 steps x 2 branches in the
U-Net dtype), at latents [B,4,64,64] for B in 1, 8, 32 and [8,4,128,128], plus [64,4,256,256] to judge kernel
quality (skipped on CPU unless --large). On CUDA also a 20-step sampling loop captured in one CUDA graph.
Reports the median time per call, the speedup over unfused PyTorch and, on CUDA, the achieved bandwidth
(minimal bytes moved / time) as a fraction of a measured device-to-device copy. Writes OUT.json
({"meta": ..., "results": [{"op", "backend", "shape", "dtype", "median_s", "speedup_vs_torch", ...}]}) and
OUT.md (the Markdown table, also printed). ``--summarize OUT.json`` prints the issue's targets against a run.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from fastfair.files import atomic_path
from fastfair.run_control import sigterm_as_exit
from fastfair.kernels import dispatch, grad_fanout, grad_fanout_torch, solver_step, solver_step_torch, testing

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (32, 4, 64, 64), (8, 4, 128, 128)]
LARGE = (64, 4, 256, 256)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FANOUT_STEPS, FANOUT_BRANCHES = 4, 2
GRAPH_STEPS = 20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_times(calls: Dict[str, Callable[[], object]], device: str, reps: int, sample_s: float) -> Dict[str, float]:
    """Median seconds per call of each function. Each sample times enough back-to-back calls to last about
    ``sample_s`` (so launch-bound calls are measured as the host issues them); the functions' samples are
    interleaved, so a busy spell of the machine hits them alike."""
    inner = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, min(1000, math.ceil(sample_s / max(time.perf_counter() - start, 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            samples[name].append(_sample(fn, device, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def _sample(fn: Callable[[], object], device: str, inner: int) -> float:
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def copy_bandwidth(device: str, reps: int) -> Optional[float]:
    """Bytes/s of a device-to-device copy of 512 MiB (read + write), the ceiling for streaming kernels."""
    if device != "cuda":
        return None
    src = torch.empty(128 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_times({"copy": lambda: dst.copy_(src)}, device, reps, 0.05)["copy"]


def fused_backends(device: str) -> List[str]:
    names = []
    for name in ("native", "triton"):
        reason = dispatch.unavailable_reason(name, device)
        if reason is None and not (name == "triton" and device == "cpu"):  # interpreted: not a speed backend
            names.append(name)
        else:
            print(f"# {name}: skipped ({reason or 'interpreted on CPU'})", file=sys.stderr)
    return names


def step_calls(shape, dtype, device, backends) -> Dict[str, Callable]:
    case = testing.StepCase(shape, torch.float32, dtype, True, 2)
    args, scalars = testing.step_inputs(case, device)
    expected = solver_step_torch(*args, **scalars)
    calls = {"torch": lambda: solver_step_torch(*args, **scalars)}
    for name in backends:
        got = solver_step(*args, **scalars, backend=name)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **testing.STEP_TOL[torch.float32])
        calls[name] = lambda name=name: solver_step(*args, **scalars, backend=name)
    return calls


def fanout_calls(shape, dtype, device, backends) -> Dict[str, Callable]:
    case = testing.FanoutCase(shape, torch.float32, dtype, FANOUT_STEPS, FANOUT_BRANCHES)
    g, scales, weights = testing.fanout_inputs(case, device)
    expected = grad_fanout_torch(g, scales, weights, out_dtype=dtype)
    out = torch.empty_like(expected)
    calls = {"torch": lambda: grad_fanout_torch(g, scales, weights, out_dtype=dtype, out=out)}
    for name in backends:
        torch.testing.assert_close(grad_fanout(g, scales, weights, out=out, backend=name), expected,
                                   **testing.FANOUT_TOL[dtype])
        calls[name] = lambda name=name: grad_fanout(g, scales, weights, out=out, backend=name)
    return calls


def graph_loop_calls(shape, dtype, backends) -> Dict[str, Callable]:
    """A GRAPH_STEPS-step sampling loop (U-Net excluded): torch eager, and each backend replayed from a graph."""
    (z, eps_c, eps_u, m), _ = testing.step_inputs(testing.StepCase(shape, torch.float32, dtype, True, 2), "cuda")
    scalars = dict(guidance=3.0, cz=1.0, ce=-0.5, a=0.5, b0=0.4, b1=-0.05)

    def loop(step, **kw):
        zi, mi = z, m
        for _ in range(GRAPH_STEPS):
            zi, mi = step(zi, eps_c, eps_u, mi, **scalars, **kw)
        return zi

    calls = {"torch": lambda: loop(solver_step_torch)}
    for name in ["torch"] + backends:
        run = (lambda name=name: loop(solver_step, backend=name))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        calls[f"{name}+graph"] = graph.replay
    return calls


def step_bytes(n: int, dtype: torch.dtype) -> int:
    return n * (4 * 4 + 2 * dtype.itemsize)  # z, m_prev, z_next, m in fp32; eps_c, eps_u


def fanout_bytes(n: int, dtype: torch.dtype) -> int:
    return n * (4 + FANOUT_STEPS * FANOUT_BRANCHES * dtype.itemsize)


def run(args, written=None) -> dict:
    """The report; ``written(report)``, when given, gets it as it stands after each shape (``meta.complete`` False
    until the last), so a run stopped by a time limit keeps what it measured."""
    device = args.device
    # On CPU, many short samples: their median drops the ones a busy machine stalled (OpenMP waits on a
    # descheduled thread). On CUDA, fewer longer ones (events measure the stream).
    reps, sample_s = (15, 0.02) if device == "cuda" else (41, 0.002)
    if args.quick:
        reps, sample_s = max(5, reps // 3), sample_s / 4
    shapes = list(SHAPES)
    notes = list(args.note)
    if device == "cuda" or args.large:
        shapes.append(LARGE)
    else:
        notes.append(f"{list(LARGE)} skipped on CPU (pass --large to include it)")
    backends = fused_backends(device)
    copy_bw = copy_bandwidth(device, reps)
    results = []
    meta = dict(date=datetime.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
                threads=torch.get_num_threads(), python=platform.python_version(), reps=reps,
                copy_gbps=copy_bw / 1e9 if copy_bw else None, notes=notes,
                fanout=f"{FANOUT_STEPS} steps x {FANOUT_BRANCHES} branches, g fp32 -> dtype",
                step="CFG, order 2, trajectory fp32, eps in dtype", command=getattr(args, "command", None),
                complete=False)
    report = dict(meta=meta, results=results)
    if written is not None:  # a run stopped in its first shape replaces an older report at the path: no stale rows
        written(report)
    benches = [("solver_step", step_calls, step_bytes), ("grad_fanout", fanout_calls, fanout_bytes)]
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in shapes:
            n = math.prod(shape)
            for op, make_calls, bytes_of in benches:
                times = median_times(make_calls(shape, dtype, device, backends), device, reps, sample_s)
                for name, seconds in times.items():
                    bandwidth = bytes_of(n, dtype) / seconds
                    results.append(dict(op=op, backend=name, shape=list(shape), dtype=dtype_name,
                                        trajectory_dtype="fp32", median_s=seconds,
                                        speedup_vs_torch=times["torch"] / seconds, achieved_gbps=bandwidth / 1e9,
                                        bandwidth_frac_of_copy=bandwidth / copy_bw if copy_bw else None))
            if device == "cuda" and shape == (8, 4, 64, 64):
                times = median_times(graph_loop_calls(shape, dtype, backends), device, reps, sample_s)
                for name, seconds in times.items():
                    results.append(dict(op=f"step_loop_{GRAPH_STEPS}", backend=name, shape=list(shape),
                                        dtype=dtype_name, trajectory_dtype="fp32", median_s=seconds,
                                        speedup_vs_torch=times["torch"] / seconds, achieved_gbps=None,
                                        bandwidth_frac_of_copy=None))
            if written is not None:
                written(report)
    meta["complete"] = True
    if written is not None:
        written(report)
    return report


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def markdown(report: dict) -> str:
    meta = report["meta"]
    command = [f"Command: `{meta['command']}`", ""] if meta.get("command") else []  # runs before it recorded none
    lines = command + [f"Kernel benchmark, {meta['date']}, {meta['device']}, torch {meta['torch']}, "
             f"{meta['threads']} threads" + (f", copy {meta['copy_gbps']:.0f} GB/s" if meta["copy_gbps"] else ""),
             "", "| op | shape | dtype | backend | median (us) | speedup vs torch | GB/s | % of copy |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        gbps = f"{r['achieved_gbps']:.1f}" if r["achieved_gbps"] is not None else ""
        frac = f"{100 * r['bandwidth_frac_of_copy']:.0f}" if r["bandwidth_frac_of_copy"] is not None else ""
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['backend']} | "
                     f"{r['median_s'] * 1e6:.1f} | {r['speedup_vs_torch']:.2f} | {gbps} | {frac} |")
    lines += [f"- {note}" for note in meta["notes"]]
    if not meta.get("complete", True):  # reports before the field were written whole
        lines.append("- partial: the run stopped before its last shape (a time limit?); the rows are what it "
                     "measured" + ("" if report["results"] else " (none)"))
    return "\n".join(lines) + "\n"


def summarize(report: dict) -> str:
    """The issue's targets against a report: a short Markdown table, one row per (target, backend)."""
    cuda = report["meta"]["copy_gbps"] is not None
    rows = []
    for r in report["results"]:
        shape, fused = tuple(r["shape"]), r["backend"] not in ("torch", "torch+graph")
        label = f"{r['op']} {'x'.join(map(str, shape))} {r['dtype']}"
        if not fused:
            continue
        if not cuda and r["op"] == "solver_step" and shape == (8, 4, 64, 64) and r["dtype"] == "fp32":
            rows.append((label, r["backend"], f"{r['speedup_vs_torch']:.2f}x", ">= 2x", r["speedup_vs_torch"] >= 2))
        elif cuda and r["op"] in ("solver_step", "grad_fanout") and shape[0] in (8, 32) and shape[2:] == (64, 64):
            rows.append((label, r["backend"], f"{r['speedup_vs_torch']:.2f}x", ">= 4x", r["speedup_vs_torch"] >= 4))
        elif cuda and shape == LARGE:
            frac = r["bandwidth_frac_of_copy"]
            rows.append((label, r["backend"], f"{100 * frac:.0f}% of copy", ">= 80%", frac >= 0.8))
        elif r["op"].startswith("step_loop"):
            rows.append((label, r["backend"], f"{r['speedup_vs_torch']:.2f}x", "captured", True))
    partial = "" if report["meta"].get("complete", True) else "; partial: the run stopped before its last shape"
    lines = [f"Targets ({report['meta']['device']}, {report['meta']['date']}{partial})", "",
             "| target | backend | measured | goal | met |", "|---|---|---:|---|---|"]
    lines += [f"| {t} | {b} | {m} | {g} | {'yes' if ok else 'NO'} |" for t, b, m, g, ok in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="output JSON path; the Markdown table goes beside it (.md)")
    parser.add_argument("--summarize", metavar="JSON", help="print the targets table of an earlier run and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", default=None, help="U-Net dtypes, comma-separated (default: fp16,fp32 on "
                                                       "CUDA, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples")
    parser.add_argument("--large", action="store_true", help=f"include {list(LARGE)} on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(summarize(json.load(f)))
        return
    if not args.json:
        parser.error("--json OUT.json is required")
    args.dtypes = args.dtypes or ("fp16,fp32" if args.device == "cuda" else "fp32")
    names = [name for name in args.dtypes.split(",") if name]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:  # checked first: a later dtype's KeyError lost the earlier ones' runs
        parser.error(f"--dtypes {args.dtypes!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'} "
                     f"(choose from {', '.join(DTYPES)})")
    args.dtypes = ",".join(names)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = " ".join(["python bench/kernels.py"] + [shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv)])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    print(markdown(run(args, written=lambda report: write_report(report, args.json))))


def write_report(report: dict, path: str) -> None:
    """``report`` to ``path`` (JSON) and its Markdown table beside it, each replaced atomically."""
    for target, text in ((path, json.dumps(report, indent=1)), (os.path.splitext(path)[0] + ".md", markdown(report))):
        with atomic_path(target) as temporary:
            with open(temporary, "w") as f:
                f.write(text)


if __name__ == "__main__":
    with sigterm_as_exit():  # gpu_check.sh's time limit: the report write it stops leaves no temporary file
        main()
