"""Attribute classifiers: a backbone network plus an ``AttributeHead`` saying what its logits mean.

Input: face crops [N, 3, S, S] in [-1, 1] (S = 224 for the public code's classifiers, fed without
ImageNet normalization). Files: safetensors holding the network's state dict in torchvision's layout
(``features...``, ``classifier...``) plus metadata (architecture, head, input size), so the file
itself says how to rebuild the model. The public code's ``.pt`` state dicts load too, given the head.
"""
import json
from typing import Dict, Optional

import torch
from torch import nn

from fastfair.classifiers.heads import AttributeHead
from fastfair.classifiers.mobilenet_v3 import MobileNetV3Large
from fastfair.classifiers.small_cnn import SmallCNN
from fastfair.files import load_state_dict, read_safetensors_metadata, save_safetensors

ARCHITECTURES = {"mobilenet_v3_large": MobileNetV3Large, "small_cnn": SmallCNN}
CLASSIFIER_FORMAT = "fastfair-attribute-classifier-1"


def build_network(arch: str, num_outputs: int, **options) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown classifier architecture {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_outputs, **options)


class AttributeClassifier(nn.Module):
    """images [N, 3, S, S] in [-1, 1] -> logits [N, head.num_outputs]; ``probabilities`` per attribute."""

    # trained on pictures resized as PIL and torchvision do (averaging when shrinking, python -m
    # fastfair.classifiers.train, as the public code's classifiers were): face crops are shrunk so too
    antialias = True

    def __init__(self, head: AttributeHead, arch: str = "mobilenet_v3_large", input_size: int = 224, **options):
        super().__init__()
        self.head, self.arch, self.input_size, self.options = head, arch, input_size, dict(options)
        self.network = build_network(arch, head.num_outputs, **options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"classifier input must be face crops [N, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        return self.network(images)

    def probabilities(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K]}."""
        return self.head.probabilities(self(images))

    def metadata(self) -> Dict[str, str]:
        return {"format": CLASSIFIER_FORMAT, "arch": self.arch, "head": self.head.to_json(),
                "input_size": str(self.input_size), "options": json.dumps(self.options)}


def save_classifier(classifier: AttributeClassifier, path: str, extra: Optional[Dict[str, str]] = None):
    """Atomically write the network's state dict (torchvision layout) and the metadata to a safetensors file."""
    save_safetensors(classifier.network.state_dict(), path, {**classifier.metadata(), **(extra or {})})


DEFAULT_ARCHITECTURE = "mobilenet_v3_large"  # the public code's classifiers


def describes_itself(path: str) -> bool:
    """Whether the file is a fastfair classifier file (its metadata name the architecture, head and input size)."""
    if not str(path).endswith(".safetensors"):
        return False
    return read_safetensors_metadata(str(path)).get("format") == CLASSIFIER_FORMAT


def _output_key(network: nn.Module) -> str:
    """The output layer's weight: the network's last matrix (registration order), e.g. classifier.3.weight."""
    return [k for k, v in network.state_dict().items() if v.dim() == 2][-1]


def file_outputs(path: str, arch: Optional[str] = None, **options) -> int:
    """How many logits the state dict in the file gives (its output layer's rows), for architecture arch."""
    key = _output_key(build_network(arch or DEFAULT_ARCHITECTURE, 1, **options))
    state = load_state_dict(path)
    if key not in state:
        raise ValueError(f"{path} has no {key}: not a {arch or DEFAULT_ARCHITECTURE} state dict (name its "
                         "architecture)")
    return int(state[key].shape[0])


def load_classifier(path: str, head: Optional[AttributeHead] = None, arch: Optional[str] = None,
                    input_size: Optional[int] = None, **options) -> AttributeClassifier:
    """A classifier from a local file, in eval mode.

    fastfair's safetensors files describe themselves (a given ``head``, ``arch`` or ``input_size`` must then
    agree); other files (e.g. the public code's ``.pt``) need ``head``, and default to
    ``arch='mobilenet_v3_large'``, ``input_size=224``.
    """
    metadata = read_safetensors_metadata(path) if path.endswith(".safetensors") else {}
    if metadata.get("format") == CLASSIFIER_FORMAT:
        stored = AttributeHead.from_json(metadata["head"])
        if head is not None and head != stored:
            raise ValueError(f"{path} predicts {stored.describe()}, but {head.describe()} was asked for")
        # a differing setting would otherwise be dropped unseen (the file's own build is the one that loads)
        for name, asked, own in (("architecture", arch, metadata["arch"]),
                                 ("input_size", input_size, int(metadata["input_size"]))):
            if asked is not None and asked != own:
                raise ValueError(f"{path} is a fastfair classifier file built with {name} {own!r}, but {asked!r} was "
                                 f"asked for: leave {name} unset (null in a run config; the file describes itself)")
        head, arch = stored, metadata["arch"]
        input_size, options = int(metadata["input_size"]), json.loads(metadata["options"])
    elif head is None:
        raise ValueError(f"{path} carries no fastfair metadata, so nothing says what its outputs mean: in a run "
                         "config give classifiers.<name>.attributes (each attribute's output indices) and "
                         "architecture; for python -m fastfair.evaluate --classifier-head (e.g. gender,race,age or "
                         "celeba40); in Python head= (e.g. head_from_names(['gender']))")
    classifier = AttributeClassifier(head, arch or DEFAULT_ARCHITECTURE, input_size or 224, **options)
    state = load_state_dict(path)
    output_key = _output_key(classifier.network)
    if output_key in state and state[output_key].shape[0] != head.num_outputs:
        raise ValueError(f"{path} has {state[output_key].shape[0]} outputs ({output_key}), but the head "
                         f"{head.describe()} needs {head.num_outputs}")
    try:
        classifier.network.load_state_dict(state)
    except RuntimeError as error:  # missing / unexpected keys or other shapes: another architecture or width
        missing = set(classifier.network.state_dict()) - set(state)
        unexpected = set(state) - set(classifier.network.state_dict())
        raise ValueError(
            f"{path}: its weights are not a {arch or DEFAULT_ARCHITECTURE} classifier's ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensor(s), e.g. {sorted(missing or unexpected)[:2]}"
            f"{'' if missing or unexpected else '; shapes differ: ' + str(error).splitlines()[-1].strip()}): give "
            "its architecture and width (classifiers.<name>.architecture in a run config)") from None
    return classifier.eval()
