"""Suite-wide settings. Tiny models are overhead-bound: one intra-op thread is faster than two on a shared
2-core machine (measured 15x on a loaded machine), and keeps timings steady."""
import torch

torch.set_num_threads(1)
