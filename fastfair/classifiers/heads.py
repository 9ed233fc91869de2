"""Attribute heads: which attributes a classifier predicts, their classes, and where their logits lie.

A head is an ordered list of attributes; the classifier's output concatenates each attribute's
logits in that order. The public code's layouts:
- FairFace-style ``[gender(2) | race(4) | age(2)]`` (``Linear(1280, 8)``; gender+race: 6);
- CelebA's 40 binary attributes, ``Linear(1280, 80)`` read as ``logits.view(N, 40, 2)``
  (class 1 = the attribute is present; ``Male`` is attribute 20).
"""
import json
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

GENDER = ("female", "male")
# seed 0120's four groups of FairFace's seven, in the output order of the public code's race classifiers
# (sail-sg/finetune-fair-diffusion logs race0..3 as white, black, indian, asian), so their .pt files read right
RACE = ("WMELH", "Black", "Indian", "Asian")
AGE = ("young", "old")  # young: under 40
KNOWN_CLASSES = {"gender": GENDER, "race": RACE, "age": AGE}

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
BINARY = ("no", "yes")


@dataclass(frozen=True)
class Attribute:
    name: str
    classes: Tuple[str, ...]


class AttributeHead:
    """Ordered attributes -> slices of the logit vector; ``split`` and ``probabilities`` per attribute."""

    def __init__(self, attributes: Sequence[Attribute]):
        if not attributes:
            raise ValueError("a classifier head needs at least one attribute")
        names = [a.name for a in attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute names must be unique, got {names}")
        for attribute in attributes:
            if len(attribute.classes) < 2:
                raise ValueError(f"attribute {attribute.name!r} needs at least 2 classes, got {attribute.classes}")
        self.attributes = [Attribute(a.name, tuple(a.classes)) for a in attributes]
        self.slices, start = {}, 0
        for attribute in self.attributes:
            self.slices[attribute.name] = slice(start, start + len(attribute.classes))
            start += len(attribute.classes)
        self.num_outputs = start

    @property
    def names(self) -> List[str]:
        return [a.name for a in self.attributes]

    def classes(self, name: str) -> Tuple[str, ...]:
        return self.attributes[self.index(name)].classes

    def index(self, name: str) -> int:
        if name not in self.slices:
            raise KeyError(f"attribute {name!r} is not in this head: it has {self.names}")
        return self.names.index(name)

    def split(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """logits [N, num_outputs] -> {attribute: logits [N, K_attribute]}."""
        if logits.shape[-1] != self.num_outputs:
            raise ValueError(f"logits have {logits.shape[-1]} outputs but the head declares {self.num_outputs} "
                             f"({self.describe()})")
        return {name: logits[..., s] for name, s in self.slices.items()}

    def probabilities(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{attribute: softmax probabilities [N, K_attribute]}."""
        return {name: part.softmax(dim=-1) for name, part in self.split(logits).items()}

    def describe(self) -> str:
        return " | ".join(f"{a.name}({len(a.classes)})" for a in self.attributes)

    def to_json(self) -> str:
        return json.dumps([[a.name, list(a.classes)] for a in self.attributes])

    @classmethod
    def from_json(cls, text: str) -> "AttributeHead":
        return cls([Attribute(name, tuple(classes)) for name, classes in json.loads(text)])

    def __eq__(self, other):
        return isinstance(other, AttributeHead) and self.attributes == other.attributes

    def __repr__(self):
        return f"AttributeHead({self.describe()})"


def celeba_head() -> AttributeHead:
    """CelebA's 40 binary attributes in the dataset's column order (80 logits)."""
    return AttributeHead([Attribute(name, BINARY) for name in CELEBA_ATTRIBUTES])


def head_from_names(names: Sequence[str]) -> AttributeHead:
    """A head of known attributes: gender, race, age, or ``celeba40`` (alone) for the 40 CelebA attributes."""
    names = list(names)
    if names == ["celeba40"]:
        return celeba_head()
    unknown = [n for n in names if n not in KNOWN_CLASSES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}: known are {sorted(KNOWN_CLASSES)} or 'celeba40'; "
                         "pass an AttributeHead for others")
    return AttributeHead([Attribute(n, KNOWN_CLASSES[n]) for n in names])


def output_head(count: int) -> AttributeHead:
    """A file's outputs unnamed: one attribute ``outputs`` whose classes are the output indices ("0", "1", ...),
    for a classifier whose outputs a run config maps itself (classifiers.<name>.attributes: {gender: [40, 41]})."""
    return AttributeHead([Attribute("outputs", tuple(str(i) for i in range(count)))])
