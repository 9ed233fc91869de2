"""fastfair: fast, memory-lean fairness finetuning of text-to-image diffusion models.

Library entry points:

- ``fastfair.schedule.solver_schedule``: DPM-Solver++ coefficients, chain weights, adjustment modes.
- ``fastfair.dft.sample``: the adjusted direct-finetuning engine (differentiable sampling at constant memory).
- ``fastfair.reference``: the literal Algorithm A.1, for tests and the baseline.
"""
import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend (imported by peft and diffusers where installed) looks for an optional 4-bit kernel
# in a package named `kernels`, and this repository's kernels/ (run from its root) or bench/kernels.py (a bench
# script's folder) answers the import: it then warns, naming fastfair's own files, about a kernel fastfair never
# uses
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
