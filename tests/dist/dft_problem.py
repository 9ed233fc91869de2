"""The fixed problem shared by the distributed DFT test and its worker: a tiny LoRA-wrapped diffusers U-Net."""
import torch

from fastfair.dft import sample
from fastfair.testing import tiny_scheduler, tiny_unet

BATCH = 4


def build_problem():
    from peft import LoraConfig

    unet = tiny_unet(seed=0)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():  # peft zero-inits lora_B; randomize so every LoRA weight gets a gradient
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(2)
    z_T = torch.randn(BATCH, 4, 8, 8, generator=g)
    cond = torch.randn(BATCH, 5, 16, generator=g)
    uncond = torch.randn(1, 5, 16, generator=g)
    target = torch.randn(BATCH, 4, 8, 8, generator=g)
    return unet, z_T, cond, uncond, target


def lora_params(unet):
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def loss_of(unet, z_T, cond, uncond, target):
    z0 = sample(unet, tiny_scheduler(), z_T, cond, uncond, num_steps=4, recompute_chunk=2)
    return ((z0 - target) ** 2).mean()
