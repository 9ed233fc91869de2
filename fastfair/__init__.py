"""fastfair: fast, memory-lean fairness finetuning of text-to-image diffusion models.

Library entry points:

- ``fastfair.schedule.solver_schedule``: DPM-Solver++ coefficients, chain weights, adjustment modes.
- ``fastfair.dft.sample``: the adjusted direct-finetuning engine (differentiable sampling at constant memory).
- ``fastfair.reference``: the literal Algorithm A.1, for tests and the baseline.
"""
__version__ = "0.1.0"
