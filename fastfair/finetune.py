"""What is finetuned, and the text embeddings of the finetuned and the original (frozen) model.

Targets (``finetune.target``):
- ``prefix``: N soft tokens inserted after the start token of the positive prompt only, as new fp32 embedding
  rows (token ids V..V+N-1 of an extended input embedding; the original vocabulary's rows stay frozen),
  initialized as ``finetune.prefix_init`` says;
- ``text_lora``: LoRA on the text encoder (q/k/v/out_proj, fc1/fc2 by default) through peft;
- ``unet_lora``: LoRA on the U-Net attention projections (to_q/to_k/to_v/to_out.0);
- ``text_unet_lora``: both; ``unet_full``: every U-Net weight.
Trainable weights are fp32 whatever the frozen dtype. The original model is the same modules with the
adapters disabled (LoRA) and without the prefix, so no second copy of the weights is held.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fastfair.config import FINETUNE_TARGETS, PREFIX_INITS, LoraConfig


class PrefixEmbedding(nn.Module):
    """The text encoder's token embedding extended by N trainable rows: ids >= V read ``prefix[id - V]``.

    base: the frozen nn.Embedding [V, D]; prefix: [N, D] fp32, initialized (``init``) as N copies of the mean base
    row (``mean``) or as the rows of N distinct vocabulary tokens drawn uniformly with torch's global generator
    (``random_tokens``, as the public prefix-tuning script does).
    """

    def __init__(self, base: nn.Embedding, num_tokens: int, init: str = "mean"):
        super().__init__()
        self.base = base
        self.vocab_size = base.num_embeddings
        weight = base.weight.detach().float()
        if init == "mean":
            rows = weight.mean(0, keepdim=True).repeat(num_tokens, 1)
        elif init == "random_tokens":
            if num_tokens > self.vocab_size:
                raise ValueError(f"finetune.prefix_tokens={num_tokens}: prefix_init=random_tokens draws distinct "
                                 f"tokens and the vocabulary has {self.vocab_size}; use fewer or prefix_init=mean")
            rows = weight[torch.randperm(self.vocab_size)[:num_tokens].to(weight.device)].clone()
        else:
            raise ValueError(f"finetune.prefix_init={init!r}: expected one of {PREFIX_INITS}")
        self.prefix = nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect (dtype, device)
        return self.base.weight

    def token_ids(self, device=None) -> torch.Tensor:
        return torch.arange(self.vocab_size, self.vocab_size + len(self.prefix), device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_prefix = ids >= self.vocab_size
        rows = self.base(ids.clamp(max=self.vocab_size - 1))
        extra = self.prefix[(ids - self.vocab_size).clamp(min=0, max=len(self.prefix) - 1)].to(rows.dtype)
        return torch.where(is_prefix[..., None], extra, rows)


def _lora_config(rank: int, alpha: Optional[float], dropout: float, modules: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(modules),
                      init_lora_weights="gaussian")


# the layer types peft's LoRA adapts (its Linear, Conv2d and Embedding layers)
_LORA_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def _check_lora_targets(module: nn.Module, modules: Sequence[str], key: str) -> None:
    """Raise ValueError naming ``key`` unless every entry of ``modules`` names a layer of ``module`` as peft matches
    them (the whole dotted name or its end: 'to_out.0' matches 'up_blocks.1.attentions.0...to_out.0'): peft refuses
    a list none of which matches, in its own words, and adapts the rest of a list where some do not, unsaid."""
    names = [name for name, layer in module.named_modules() if isinstance(layer, _LORA_LAYERS)]
    unmatched = [target for target in modules
                 if not any(name == target or name.endswith("." + target) for name in names)]
    if unmatched:
        # a layer's own name, with its container's where it is an index ('to_out.0')
        leaves = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
                         for name in names})
        shown = ", ".join(leaves[:24]) + (", ..." if len(leaves) > 24 else "")
        raise ValueError(f"{key}={list(modules)}: {', '.join(map(repr, unmatched))} names no layer of the "
                         f"{type(module).__name__}; its layers that LoRA can adapt end in: {shown}")


def _add_lora(module: nn.Module, config) -> None:
    # peft directly (transformers' add_adapter wants a newer peft); adapter name "default" as diffusers uses
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module)


def _lora_layers(module: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _fp32_trainable(module: nn.Module) -> None:
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()


# the parts of a model (fastfair.models.StableDiffusionParts fields) FinetunedModel changes in place, per target:
# an evaluation copies these of a shared base model and shares the others
CHANGED_PARTS = {"prefix": ("text_encoder",), "text_lora": ("text_encoder",), "unet_lora": ("unet",),
                 "text_unet_lora": ("text_encoder", "unet"), "unet_full": ("unet",)}


class FinetunedModel:
    """The text encoder and U-Net with the trainable weights of one finetuning target.

    encode(prompts) -> [B, L, D] embeddings of the finetuned model; encode_original(prompts): the frozen model's.
    ``trainable`` maps stable names to the trainable parameters (checkpoints and export use the names).
    ``training=False`` builds it to sample only (evaluation): under ``unet_full`` no frozen copy of the U-Net
    (``original_unet`` then refuses) and no float32 cast of the trainable weights, which are about to be
    overwritten by a checkpoint's in the sampling dtype; each would add a U-Net's size to the peak memory.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, unet: nn.Module, target: str = "text_lora",
                 prefix_tokens: int = 5, lora=None, prefix_init: str = "mean", training: bool = True):
        if target not in FINETUNE_TARGETS:
            raise ValueError(f"finetune.target={target!r}: expected one of {FINETUNE_TARGETS}")
        self.tokenizer, self.text_encoder, self.unet, self.target = tokenizer, text_encoder, unet, target
        self.prefix: Optional[PrefixEmbedding] = None
        lora = lora if lora is not None else LoraConfig()  # finetune.lora's defaults
        rank, alpha, dropout = lora.rank, lora.alpha, lora.dropout
        if target == "prefix":
            room = tokenizer.model_max_length - 2  # the start and end tokens always take their places
            if prefix_tokens > room:
                raise ValueError(f"finetune.prefix_tokens={prefix_tokens}: the text encoder reads "
                                 f"{tokenizer.model_max_length} tokens, two of them the start and end tokens: use "
                                 f"at most {room}, fewer to leave room for the prompt")
            self.prefix = PrefixEmbedding(text_encoder.get_input_embeddings(), prefix_tokens, prefix_init)
            text_encoder.set_input_embeddings(self.prefix)
        if target in ("text_lora", "text_unet_lora"):
            _check_lora_targets(text_encoder, lora.text_modules, "finetune.lora.text_modules")
            _add_lora(text_encoder, _lora_config(rank, alpha, dropout, lora.text_modules))
        if target in ("unet_lora", "text_unet_lora"):
            _check_lora_targets(unet, lora.unet_modules, "finetune.lora.unet_modules")
            _add_lora(unet, _lora_config(rank, alpha, dropout, lora.unet_modules))
        # full finetuning has no adapter to switch off: the original images need a frozen copy
        self.frozen_unet = copy.deepcopy(unet) if target == "unet_full" and training else None
        if target == "unet_full":
            unet.requires_grad_(True)
        for module in (text_encoder, unet):
            module.eval()
            if training:
                _fp32_trainable(module)
        self.trainable: Dict[str, nn.Parameter] = {
            f"{part}.{name}": p for part, module in (("text_encoder", text_encoder), ("unet", unet))
            for name, p in module.named_parameters() if p.requires_grad}

    @property
    def trains_unet(self) -> bool:
        return self.target in ("unet_lora", "text_unet_lora", "unet_full")

    def parameters(self) -> List[nn.Parameter]:
        return list(self.trainable.values())

    def _token_ids(self, prompts: Sequence[str], reserve: int) -> torch.Tensor:
        """[B, L] ids padded to the tokenizer's max length, with `reserve` slots left free for the prefix."""
        device = self.text_encoder.device
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                              max_length=self.tokenizer.model_max_length - reserve).input_ids.to(device)

    def encode_original(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, D] frozen-model embeddings (adapters off, no prefix), no grad."""
        with torch.no_grad(), self._adapters_off():
            return self.text_encoder(self._token_ids(prompts, 0))[0]

    def encode(self, prompts: Sequence[str], positive: bool = True) -> torch.Tensor:
        """[B, L, D] finetuned-model embeddings; the prefix goes only into positive prompts."""
        if self.prefix is None:
            return self.text_encoder(self._token_ids(prompts, 0))[0]
        if not positive:
            return self.encode_original(prompts)
        ids = self._token_ids(prompts, len(self.prefix.prefix))
        prefix = self.prefix.token_ids(ids.device).expand(ids.shape[0], -1)
        return self.text_encoder(torch.cat([ids[:, :1], prefix, ids[:, 1:]], dim=1))[0]

    @contextlib.contextmanager
    def _adapters_off(self):
        """The frozen model: LoRA adapters disabled, the prefix unused (its ids never appear)."""
        layers = _lora_layers(self.text_encoder) + _lora_layers(self.unet)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @contextlib.contextmanager
    def original_unet(self):
        """Context yielding the frozen U-Net: LoRA disabled, or the frozen copy under full finetuning."""
        if self.frozen_unet is not None:
            yield self.frozen_unet
            return
        if self.target == "unet_full":
            raise RuntimeError("original_unet: a unet_full model built with training=False keeps no frozen copy "
                               "of the U-Net; build it with training=True")
        with self._adapters_off():
            yield self.unet
