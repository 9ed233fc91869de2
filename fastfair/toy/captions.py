"""The toy world's captions: concepts (occupations, sports, "a person"), each with its own attribute skew.

Every concept has a caption (the project's templates: ``OCCUPATION_TEMPLATE``, ``SPORT_TEMPLATE``) and
an independent categorical distribution per attribute. Training and held-out concepts are disjoint
lists; all of them are in the toy model's training data (like SD's pretraining data, which held-out
prompts are only held out of the debiasing finetuning). Skews, drawn once from a fixed seed:
- gender: the majority class has 85-95 % (so the per-concept bias is 0.7-0.9), alternating between
  female-majority and male-majority concepts;
- race: one dominant class with 50-70 %, the rest split at random;
- age: old with 10-30 % or 70-90 %, alternating every two concepts.
"a photo of the face of a person" is balanced (uniform on every attribute).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastfair.prompts import OCCUPATION_TEMPLATE, SPORT_TEMPLATE, fill_template
from fastfair.toy.world import ATTRIBUTES

TRAIN_OCCUPATIONS = (
    "physician", "surgeon", "nurse", "pharmacist", "dentist", "paramedic", "midwife", "baker", "teacher",
    "electrician", "painter", "dancer", "singer", "tailor", "secretary", "soldier", "sailor", "writer", "poet",
    "gardener",
)
HELDOUT_OCCUPATIONS = (
    "librarian", "firefighter", "judge", "lawyer", "accountant", "cashier", "farmer", "architect", "carpenter",
    "chef",
)
TRAIN_SPORTS = ("soccer", "baseball", "handball", "netball", "squash", "yoga", "karate", "sailing")
HELDOUT_SPORTS = ("tennis", "basketball", "golf", "boxing")
PERSON_PROMPT = "a photo of the face of a person"
SPLITS = ("train", "heldout")
KINDS = ("occupation", "sport", "person")
# share of each kind among training captions; within a kind, concepts are equally likely
KIND_WEIGHTS = {"occupation": 0.8, "sport": 0.15, "person": 0.05}
SKEW_SEED = 2024


@dataclass(frozen=True)
class Concept:
    """A caption and its attribute distribution {attribute: probabilities over the classes}."""

    name: str
    kind: str
    split: str
    prompt: str
    probabilities: Dict[str, Tuple[float, ...]]


def _skewed(index: int, generator: torch.Generator) -> Dict[str, Tuple[float, ...]]:
    """A concept's skewed distributions; ``index`` alternates the majority classes (see module doc)."""
    majority = 0.85 + 0.10 * torch.rand((), generator=generator).item()
    female = majority if index % 2 == 0 else 1 - majority
    dominant = int(torch.randint(4, (), generator=generator))
    dominant_share = 0.5 + 0.2 * torch.rand((), generator=generator).item()
    rest = torch.rand(3, generator=generator) + 0.2
    rest = (rest / rest.sum() * (1 - dominant_share)).tolist()
    race = tuple(rest[:dominant] + [dominant_share] + rest[dominant:])
    old = 0.1 + 0.2 * torch.rand((), generator=generator).item()
    old = old if (index // 2) % 2 == 0 else 1 - old
    return {"gender": (female, 1 - female), "race": race, "age": (1 - old, old)}


def _build_concepts() -> Tuple[Concept, ...]:
    generator = torch.Generator().manual_seed(SKEW_SEED)
    concepts = []
    for kind, template, lists in (("occupation", OCCUPATION_TEMPLATE, (TRAIN_OCCUPATIONS, HELDOUT_OCCUPATIONS)),
                                  ("sport", SPORT_TEMPLATE, (TRAIN_SPORTS, HELDOUT_SPORTS))):
        for split, names in zip(SPLITS, lists):
            for index, name in enumerate(names):
                concepts.append(Concept(name, kind, split, fill_template(template, name), _skewed(index, generator)))
    uniform = {name: tuple(1 / len(classes) for _ in classes) for name, classes in ATTRIBUTES.items()}
    concepts.append(Concept("person", "person", "train", PERSON_PROMPT, uniform))
    return tuple(concepts)


CONCEPTS: Tuple[Concept, ...] = _build_concepts()


def concepts(split: Optional[str] = None, kind: Optional[str] = None) -> List[Concept]:
    """The concepts of a split ("train" / "heldout") and kind ("occupation" / "sport" / "person"); None: all."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return [c for c in CONCEPTS if split in (None, c.split) and kind in (None, c.kind)]


def prompts(split: str = "heldout", kind: str = "occupation") -> List[str]:
    """Full prompts of a split and kind, e.g. the held-out occupation prompts for evaluation."""
    return [c.prompt for c in concepts(split, kind)]


def concept_weights(selection: Sequence[Concept] = CONCEPTS) -> torch.Tensor:
    """[C] probabilities of drawing each concept as a training caption (``KIND_WEIGHTS``, split within a kind)."""
    counts = {kind: sum(c.kind == kind for c in selection) for kind in KINDS}
    weights = torch.tensor([KIND_WEIGHTS[c.kind] / counts[c.kind] for c in selection], dtype=torch.float64)
    return weights / weights.sum()


def sample_captions(count: int, generator: torch.Generator) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """Training captions and their labels: concepts by ``concept_weights``, labels from each concept's skew."""
    chosen = torch.multinomial(concept_weights(), count, replacement=True, generator=generator)
    labels = {}
    for name in ATTRIBUTES:
        table = torch.tensor([c.probabilities[name] for c in CONCEPTS], dtype=torch.float64)
        labels[name] = torch.multinomial(table[chosen], 1, generator=generator)[:, 0]
    return [CONCEPTS[i].prompt for i in chosen.tolist()], labels
