"""What every toy training loop shares: determinism settings and one AdamW loop with a progress bar."""
import math
from typing import Callable, Iterable, List, Optional

import torch
from tqdm import tqdm

# One thread: on a shared 2-core machine two OpenMP threads run several times slower than one, and a
# fixed count keeps float reductions in the same order, which the checksum of the build relies on.
BUILD_THREADS = 1


def make_deterministic(threads: int = BUILD_THREADS) -> None:
    """Fixed thread count and deterministic kernels (raises if an op has no deterministic version)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5 % of ``peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters: ema = d * ema + (1 - d) * current, with the usual warm-up
    d = min(decay, (1 + step) / (10 + step)) so the random initial weights are forgotten early."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.averages = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, parameter in zip(self.averages, self.parameters):
            average.lerp_(parameter.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for average, parameter in zip(self.averages, self.parameters):
            parameter.copy_(average)


def fit(parameters: List[torch.nn.Parameter], loss_at: Callable[[int], torch.Tensor], steps: int, lr: float,
        description: str, warmup: int = 50, weight_decay: float = 0.0, ema_decay: Optional[float] = None,
        clip: float = 1.0) -> List[float]:
    """Minimize ``loss_at(step)`` with AdamW for ``steps`` steps; with ``ema_decay`` the parameters end as
    their EMA. Returns the per-step losses."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    ema = EMA(parameters, ema_decay) if ema_decay else None
    losses = []
    progress = tqdm(range(steps), desc=description, mininterval=2.0, leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, min(warmup, max(1, steps // 4)))
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        if ema is not None:
            ema.update(step)
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    if ema is not None:
        ema.copy_to_parameters()
    return losses
