"""Pretraining the toy CLIP text encoder (a stand-in for CLIP's image-text pretraining).

SD trains its U-Net on the outputs of a frozen, pretrained CLIP text encoder, whose embeddings
already say what the images a caption goes with look like. A randomly initialized toy encoder gives
near-identical outputs for prompts that differ in one word, and the U-Net then learns to ignore the
text. So the toy encoder is pretrained, then frozen, like CLIP: a linear probe on its hidden states
(mean over positions) must predict the attributes of the portraits each caption describes. The loss
is the expected cross-entropy of the portraits' labels under each concept's distribution, i.e.
sum_c w_c sum_attr H(p_c,attr, softmax(probe(h_c))_attr) with w_c the caption frequencies in the data;
it is minimized where the probe reproduces every concept's skew, so the embeddings carry it.
"""
import torch
import torch.nn.functional as F

from fastfair.toy.captions import CONCEPTS, concept_weights
from fastfair.toy.models import TEXT_WIDTH, build_text_encoder
from fastfair.toy.training import fit
from fastfair.toy.world import ATTRIBUTES


def tokenize(tokenizer, prompts) -> torch.Tensor:
    """[P, L] input ids padded to the tokenizer's max length, as the SD pipeline does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def pretrain_text_encoder(tokenizer, steps: int, seed: int, lr: float = 2e-3):
    """A ``CLIPTextModel`` trained by the attribute probe (see module doc), in eval mode, frozen."""
    text_encoder = build_text_encoder(tokenizer, seed)
    probe = torch.nn.Linear(TEXT_WIDTH, sum(len(classes) for classes in ATTRIBUTES.values()))
    input_ids = tokenize(tokenizer, [c.prompt for c in CONCEPTS])
    weights = concept_weights().float()
    targets = torch.cat([torch.tensor([c.probabilities[name] for c in CONCEPTS]) for name in ATTRIBUTES], dim=1)
    sizes = [len(classes) for classes in ATTRIBUTES.values()]

    def loss_at(step):
        logits = probe(text_encoder(input_ids)[0].mean(dim=1))
        loss = torch.zeros(())
        for part, target in zip(logits.split(sizes, dim=1), targets.float().split(sizes, dim=1)):
            loss = loss + (weights * -(target * F.log_softmax(part, dim=1)).sum(dim=1)).sum()
        return loss

    fit(list(text_encoder.parameters()) + list(probe.parameters()), loss_at, steps, lr, "text encoder")
    return text_encoder.eval().requires_grad_(False)
