"""``python fastfair/train.py --config ... --check [--check-iterations N]``: a run's start without the run.

Everything a run checks when it starts (settings, files, models, classifiers against the targets, the resume and
output_dir, its lock) and N timed iterations (default 2), with nothing saved: no checkpoint, config.yaml, log or
image. What it reports answers the questions to settle before a long job is queued: does an iteration fit in
memory, how long will the run take, how much disk will its checkpoints take (`Trainer.check` measures,
`Preflight` says).
"""
from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

DEFAULT_ITERATIONS = 2  # the first pays the warm-ups (kernel selection and compilation, the memory plan)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors inside obj (nested dicts, lists, tuples): about what torch.save or safetensors write."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def saved_steps(start: int, max_steps: int, checkpoint_every: int) -> List[int]:
    """The iterations a run from `start` to `max_steps` saves at (every checkpoint_every-th and the last)."""
    return [step for step in range(start + 1, max_steps + 1) if step % checkpoint_every == 0 or step == max_steps]


def retention(existing: Iterable[int], saves: Iterable[int], keep_last: int,
              keep_every: int) -> Tuple[List[int], int]:
    """(the checkpoints output_dir holds when the run ends, the most it holds at once): each save writes its
    checkpoint beside the others, then retention (fastfair.checkpoint.prune) keeps the newest keep_last and every
    keep_every-th."""
    held = sorted(existing)
    most = len(held)
    for step in saves:
        held.append(step)
        most = max(most, len(held))
        newest = set(held[-keep_last:])
        held = [s for s in held if s in newest or (keep_every and s % keep_every == 0)]
    return held, most


def free_bytes(folder) -> int:
    """Free space on the filesystem that holds folder (its nearest existing parent if it does not exist yet)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s"


@dataclass
class Preflight:
    """What `Trainer.check` found. Sizes in bytes; iteration_seconds: each checked iteration's wall time (rank 0);
    peak_memory: the most any rank used (CUDA: allocated by torch, peak_reserved what its allocator held; CPU:
    resident set); device_memory: the device's total (CUDA) or None; memory_plans: (keep_graph_steps,
    keep_attention_steps) per sampling-step count, as sampler.memory_budget_gb chose them in the checked
    iterations; checkpoint_bytes: one checkpoint's tensors (weights, EMA, optimizer state: measured after an
    iteration, else estimated, optimizer_state_measured False); existing_checkpoints, saves, kept: steps already
    in output_dir, to be saved, held at the end; most_held: the most checkpoints held at once."""

    output_dir: str
    resumes_from: Optional[str]
    start: int
    max_steps: int
    world: int
    images_per_iteration: int
    steps_range: Tuple[int, int]  # the sampling step counts the run draws from (low == high: sampler.num_steps)
    trainable_parameters: int
    iteration_seconds: List[float]
    peak_memory: int
    device_memory: Optional[int]
    checkpoint_bytes: int
    optimizer_state_measured: bool
    existing_checkpoints: List[int]
    saves: List[int]
    kept: List[int]
    most_held: int
    free_disk: int
    memory_plans: Optional[Dict[int, Tuple[int, int]]] = None  # sampler.memory_budget_gb's: steps -> keeps
    grad_steps: Optional[int] = None  # sampler.grad_steps: the steps of each sampling gradients pass through
    steps_drawn: List[int] = field(default_factory=list)  # the step count of each checked iteration
    peak_reserved: Optional[int] = None  # CUDA: the most torch's caching allocator held (what runs out first)

    @property
    def seconds_per_iteration(self) -> Optional[float]:
        """The median of the checked iterations after the first (which pays the warm-ups; the first alone if only
        one ran), each scaled to the mean step count of steps_range from the count it drew (in proportion: an
        upper bound for fewer steps, as decoding and the losses do not scale)."""
        times = self.iteration_seconds
        if self.steps_drawn:
            mean = (self.steps_range[0] + self.steps_range[1]) / 2
            times = [t * mean / n for t, n in zip(times, self.steps_drawn)]
        return statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else None)

    def _differentiated(self, steps: int) -> str:
        """' (K with gradients)' where sampler.grad_steps differentiates fewer of a sampling's steps (the plan
        keeps among those)."""
        return f" ({self.grad_steps} with gradients)" if self.grad_steps and self.grad_steps < steps else ""

    @property
    def disk_needed(self) -> int:
        """Bytes the run's checkpoints add to output_dir's disk at their most (a save writes its checkpoint before
        retention prunes an older one)."""
        return max(0, self.most_held - len(self.existing_checkpoints)) * self.checkpoint_bytes

    def problems(self) -> List[str]:
        """What would stop the run part way (the disk filling up), each with the way out."""
        if self.saves and self.disk_needed > self.free_disk:
            return [f"its checkpoints need about {_gib(self.disk_needed)} and {_gib(self.free_disk)} is free where "
                    f"output_dir={self.output_dir} lies: free space, keep fewer (keep_last, keep_every) or choose "
                    "another output_dir"]
        return []

    def summary(self) -> str:
        todo = self.max_steps - self.start
        where = f"resumes from {self.resumes_from} (step {self.start})" if self.resumes_from else "a fresh start"
        low, high = self.steps_range
        steps = f"{low}-{high}" if low != high else f"{low}"
        lines = [f"output_dir   {self.output_dir}: {where}",
                 f"training     {todo} iterations to step {self.max_steps}, {self.images_per_iteration} images each"
                 + (f" ({self.images_per_iteration // self.world} on each of {self.world} processes)"
                    if self.world > 1 else " on 1 process") + f", {steps} sampling steps; "
                 f"{self.trainable_parameters:,} trainable parameters"]
        if self.iteration_seconds:
            times = ", ".join(f"{s:.2f}" for s in self.iteration_seconds)
            if low != high:
                times += f" s at {', '.join(map(str, self.steps_drawn))} steps"
            first = " (the first pays the warm-ups)" if len(self.iteration_seconds) > 1 else ""
            lines.append(f"iterations   {len(self.iteration_seconds)} checked: {times}{'' if low != high else ' s'}"
                         f"{first}")
            of = f" of {_gib(self.device_memory)}" if self.device_memory else ""
            held = f" ({_gib(self.peak_reserved)} reserved)" if self.peak_reserved else ""
            lines.append(f"memory       peak {_gib(self.peak_memory)}{held}{of} (the most on any process)")
            if self.memory_plans:
                plans = "; ".join(f"{steps} steps{self._differentiated(steps)}: {graphs} graphs, {attention} "
                                  "attention outputs"
                                  for steps, (graphs, attention) in sorted(self.memory_plans.items()))
                lines.append(f"keeps        (sampler.memory_budget_gb) {plans}")
            per = self.seconds_per_iteration
            at = f" (scaled to {(low + high) / 2:g} steps)" if low != high else ""
            lines.append(f"estimate     {todo} x {per:.2f} s{at} = {_duration(todo * per)} of training, checkpoints "
                         "and logging not counted")
        else:
            lines.append("iterations   none checked" + (" (nothing to train)" if not todo else ""))
        if self.saves:
            note = "" if self.optimizer_state_measured else " (the optimizer state estimated: it is made at " \
                                                            "the first iteration)"
            lines.append(f"checkpoints  {len(self.saves)} to write, {len(self.kept)} kept at the end, "
                         f"{_gib(self.checkpoint_bytes)} each{note}: about {_gib(self.disk_needed)} more on disk, "
                         f"{_gib(self.free_disk)} free")
        lines += [f"PROBLEM      {problem}" for problem in self.problems()]
        return "\n".join(lines)
