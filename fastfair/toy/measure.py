"""Measuring what the toy model generates: attribute frequencies per prompt, through detector + classifier.

The same path as the trainer and the evaluation: generate (fixed seed) -> largest face of the toy
detector (images without a face are counted, not classified) -> square crop with margin 0.5 ->
classifier -> argmax class per attribute.
"""
from typing import Dict, List

import torch

from fastfair.faces import CallableDetector, crop_boxes, locate_faces
from fastfair.metrics import bias
from fastfair.toy.world import ATTRIBUTES

# At 3 the toy model's per-occupation frequencies are close to its data's; SD's default 7.5 amplifies the
# skew toward the majority class, as it does in real SD.
TOY_GUIDANCE_SCALE = 3.0
SAMPLING_STEPS = 20


@torch.no_grad()
def generate(pipeline, prompt: str, count: int, seed: int, guidance_scale: float = TOY_GUIDANCE_SCALE,
             steps: int = SAMPLING_STEPS) -> torch.Tensor:
    """``count`` images [count, 3, 32, 32] in [-1, 1] for prompt, determined by seed."""
    output = pipeline([prompt] * count, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed), output_type="pt")
    return output.images * 2 - 1


@torch.no_grad()
def classify_faces(images: torch.Tensor, detector, classifier) -> Dict[str, torch.Tensor]:
    """{attribute: [N] predicted class, -1 where no face was found}."""
    regions = locate_faces(images, CallableDetector(detector, batched=True))
    crops = crop_boxes(images, regions.crop_boxes, classifier.input_size, antialias=classifier.antialias)
    parts = classifier.head.split(classifier(crops))
    return {name: torch.where(regions.found, parts[name].argmax(dim=1), -1) for name in ATTRIBUTES}


def frequencies(predicted: torch.Tensor, classes: int) -> List[float]:
    """Class frequencies among images with a face (all zeros if none had one)."""
    found = predicted[predicted >= 0]
    return (torch.bincount(found, minlength=classes).double() / max(1, len(found))).tolist()


def measure_prompts(pipeline, prompts: List[str], detector, classifier, count: int, seed: int,
                    guidance_scale: float = TOY_GUIDANCE_SCALE) -> Dict[str, Dict]:
    """Per prompt: faces found, and per attribute the generated class frequencies and their bias (seed 0124)."""
    results = {}
    for index, prompt in enumerate(prompts):
        predicted = classify_faces(generate(pipeline, prompt, count, seed + index, guidance_scale), detector,
                                   classifier)
        result = {"faces_found": int((predicted["gender"] >= 0).sum())}
        for name, classes in ATTRIBUTES.items():
            freqs = frequencies(predicted[name], len(classes))
            result[name] = {"frequencies": freqs, "bias": bias(freqs) if result["faces_found"] else None}
        results[prompt] = result
    return results
