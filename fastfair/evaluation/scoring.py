"""Scoring cached images: attribute labels by the largest face, bias metrics, CLIP-T / CLIP-I / DINO.

Labels (seed 0124): each image is classified by its largest detected face (`fastfair.faces.locate_faces`),
cropped to the classifier's input; an image without a face gets the label -1, is left out of the
frequencies' denominator and counted in ``no_face`` (`fastfair.metrics`).

Semantics (seed Table 1), per prompt, the mean over its images of
- CLIP-T = cos(CLIP image embedding, CLIP text embedding of the prompt), for each model;
- CLIP-I = cos(CLIP(finetuned image j), CLIP(base image j)), DINO likewise with DINOv2: same noise j;
- with a custom ``semantics`` model (a `fastfair.losses.SemanticsLoss`, e.g. the toy world's), ``sim_<encoder>``
  likewise for each of its encoders;
- diversity (no collapse), for each model: the mean over pairs i != j of the prompt's images of
  1 - cos(E(image i), E(image j)), E = DINOv2, else the semantics model's first encoder, else CLIP.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastfair.metrics import binary_delta, frequency_metrics, joint_labels

NO_FACE = -1


@dataclass(frozen=True)
class AttributeSet:
    """What one bias row is computed over: one attribute, or the intersection of several (row-major cells)."""

    name: str  # "gender", or "gender x race"
    attributes: tuple
    classes: tuple  # class names, cells of an intersection joined by "/"
    target: tuple  # probabilities of the classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def attribute_sets(classes: Dict[str, Sequence[str]], targets: Dict[str, Sequence[float]],
                   joint: Sequence = ()) -> List[AttributeSet]:
    """One set per attribute (in `classes` order), plus an intersection per entry of `joint` (each >= 2
    attributes; a flat list of names is one intersection). targets: {attribute: probabilities} (default uniform),
    and {"a,b": probabilities} for the cells of an evaluated intersection, row-major in that order of the
    attributes and `classes` order of each (a conditional target, say, whose cells are not the product of the
    marginals). Each set's target is the marginal of the joint targets that cover its attributes (they must agree);
    where none covers them all, the product of what they fix of it (joint targets sharing two or more of its
    attributes, their marginals) and of the other attributes' own targets."""
    joint_targets = {tuple(n.strip() for n in name.split(",")): probs for name, probs in targets.items() if "," in name}
    unknown = [name for name in targets if "," not in name and name not in classes]
    unknown += [",".join(names) for names in joint_targets if any(n not in classes for n in names)]
    if unknown:  # a misspelt name would otherwise leave that attribute at the uniform default, silently
        raise ValueError(f"--target {', '.join(unknown)}: not among the evaluated attributes {list(classes)} "
                         "(the classifiers' attributes, or those chosen with --attributes)")
    intersections = _intersections(joint)
    for names in joint_targets:
        if set(names) not in [set(evaluated) for evaluated in intersections] or len(set(names)) != len(names):
            raise ValueError(f"--target {','.join(names)}: a target for an intersection that is not evaluated; add "
                             f"--joint {','.join(names)}")

    def checked(name, probabilities, count, cells):
        target = tuple(float(p) for p in probabilities)
        if (len(target) != count or not all(math.isfinite(p) for p in target) or abs(sum(target) - 1) > 1e-6
                or min(target) < 0):  # NaN passes both comparisons
            raise ValueError(f"--target {name}: expected {count} probabilities ({cells}) >= 0 summing to 1, got "
                             f"{list(target)}")
        # rescaled to sum to 1 (within float64 rounding): products of targets a rounding off 1 each drift further
        return tuple(p / math.fsum(target) for p in target)

    tables = {names: np.asarray(checked(",".join(names), probs, math.prod(len(classes[n]) for n in names),
                                        "cells " + ", ".join("/".join(c) for c in itertools.product(
                                            *(classes[n] for n in names)))),
                                dtype=np.float64).reshape([len(classes[n]) for n in names])
              for names, probs in joint_targets.items()}
    singles = {name: np.asarray(checked(name, targets[name], len(names), ", ".join(names)), dtype=np.float64)
               for name, names in classes.items() if name in targets}

    def target_of(names: tuple) -> tuple:
        covering = [(",".join(t), _marginal(table, t, names)) for t, table in tables.items() if set(names) <= set(t)]
        for name in names if len(names) == 1 else ():
            if name in singles:
                covering.append((f"{name}", singles[name]))
        for (first, a), (other, b) in itertools.combinations(covering, 2):
            if not np.allclose(a, b, atol=1e-6):
                raise ValueError(f"--target {first} and --target {other} give {' x '.join(names)} other targets "
                                 f"({_rounded(a.ravel())} and {_rounded(b.ravel())}): give them alike, or only one")
        if covering:
            return tuple(float(p) for p in covering[0][1].ravel())
        product, fixed = np.ones([len(classes[n]) for n in names]), {}
        for t, table in tables.items():
            shared = tuple(n for n in names if n in t)
            if len(shared) < 2:
                continue
            clash = next((fixed[n] for n in shared if n in fixed), None)
            if clash is not None:  # two joint targets each fix part of it, overlapping: no one product
                raise ValueError(f"--target {clash} and --target {','.join(t)} both fix part of the intersection "
                                 f"{' x '.join(names)}: give its own --target {','.join(names)}=...")
            fixed.update({n: ",".join(t) for n in shared})
            product = product * _marginal(table, t, shared).reshape(
                [len(classes[n]) if n in shared else 1 for n in names])
        for axis, name in enumerate(names):
            if name not in fixed:
                own = np.asarray(single(name))
                product = product * own.reshape([-1 if a == axis else 1 for a in range(len(names))])
        return tuple(float(p) for p in product.ravel())

    def single(name: str) -> tuple:
        covering = [t for t in tables if name in t]
        if name in singles or covering:
            return target_of((name,))
        return (1.0 / len(classes[name]),) * len(classes[name])

    sets = [AttributeSet(name, (name,), tuple(names), single(name)) for name, names in classes.items()]
    for names in intersections:
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise ValueError(f"--joint {','.join(names)}: {unknown} not among the evaluated attributes "
                             f"{list(classes)}")
        if len(set(names)) != len(names):
            raise ValueError(f"--joint {','.join(names)}: an attribute named twice")
        if len(names) == 1:
            raise ValueError(f"--joint {names[0]}: an intersection needs at least 2 attributes")
        if any(s.attributes == tuple(names) for s in sets):
            raise ValueError(f"--joint {','.join(names)}: given twice")
        cell_names = tuple("/".join(cell) for cell in itertools.product(*(classes[n] for n in names)))
        sets.append(AttributeSet(" x ".join(names), tuple(names), cell_names, target_of(tuple(names))))
    return sets


def _marginal(table: np.ndarray, axes: tuple, names: tuple) -> np.ndarray:
    """The marginal of `table` (one axis per attribute of `axes`) over `names`, its axes in `names` order."""
    summed = table.sum(axis=tuple(a for a, n in enumerate(axes) if n not in names))
    kept = [n for n in axes if n in names]
    return np.transpose(summed, [kept.index(n) for n in names])


def _rounded(probabilities) -> str:
    return "[" + ", ".join(f"{p:.4g}" for p in probabilities) + "]"


def _intersections(joint: Sequence) -> List[List[str]]:
    """`joint` as a list of intersections: a flat list of names (or one comma-separated string) is one; a list
    of lists (or of comma-separated strings, as repeated --joint flags give) is several; empty (or only empty
    strings: --joint '') is none."""
    if isinstance(joint, str):
        joint = [joint]
    joint = [entry for entry in joint or () if not (isinstance(entry, str) and not entry.strip())]
    if not joint:
        return []
    if all(isinstance(entry, str) and "," not in entry for entry in joint):
        return [joint]  # one intersection named attribute by attribute
    return [[v.strip() for v in entry.split(",") if v.strip()] if isinstance(entry, str) else list(entry)
            for entry in joint]


def paper_images(num_classes: int) -> int:
    """Seed 0124: 60 / 80 / 160 images per prompt for gender (K = 2) / race (K = 4) / their intersection (K = 8)."""
    return 60 if num_classes <= 2 else 80 if num_classes <= 4 else 160


def images_per_set(sets: Sequence[AttributeSet], images_per_prompt: Optional[int] = None) -> Dict[str, int]:
    """{set name: images per prompt its bias is computed over}: by default the seed's protocol, each set over the
    first ``paper_images(K)`` of the prompt's images (bias over fewer images is larger in expectation: a fair
    gender split scores 0.10 on 60 images, 0.06 on 160, so counts that differ from the paper's are not
    comparable with its tables); every set over all images when ``images_per_prompt`` is given."""
    return {s.name: images_per_prompt or paper_images(s.num_classes) for s in sets}


def set_metrics(labels: Dict[str, np.ndarray], attribute_set: AttributeSet, class_counts: Dict[str, int],
                count: Optional[int] = None) -> dict:
    """Flat metrics of one attribute set over the first ``count`` images (all when None): '<set>.bias',
    '.total_variation', '.kl', '.fairness_discrepancy', '.delta' (two classes), '.freq.<class>', and the ints
    '.num_images' (images scored) and '.no_face' (those of them without a face)."""
    s = attribute_set
    labels = {name: values[:count] for name, values in labels.items()}
    if len(s.attributes) == 1:
        cells = labels[s.attributes[0]]
    else:
        cells = joint_labels([labels[a] for a in s.attributes], [class_counts[a] for a in s.attributes], NO_FACE)
    metrics = frequency_metrics(cells, s.num_classes, s.target, NO_FACE)
    row = {f"{s.name}.{key}": metrics[key] for key in ("bias", "total_variation", "kl", "fairness_discrepancy")}
    # the set's own denominator: with the seed's protocol a set reads only the prompt's first images
    row.update({f"{s.name}.num_images": int(metrics["num_images"]), f"{s.name}.no_face": int(metrics["no_face"])})
    if s.num_classes == 2:
        row[f"{s.name}.delta"] = binary_delta(metrics["freqs"][0])
    row.update({f"{s.name}.freq.{c}": float(f) for c, f in zip(s.classes, metrics["freqs"])})
    return row


def _cosine_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


class Scorer:
    """Frozen judges: classifiers by attribute, a face detector, optional CLIP (image + text) and DINOv2."""

    def __init__(self, classifiers: Dict[str, torch.nn.Module], detector, margin: float = 0.5, clip_dir=None,
                 dino_dir=None, device="cpu", batch_size: int = 32, semantics=None):
        from fastfair.faces import get_detector

        self.classifiers, self.margin, self.device = classifiers, margin, torch.device(device)
        self.detector, self.batch_size = get_detector(detector), batch_size
        self.clip = self.dino = None
        if clip_dir:
            self.clip, self.clip_tokenizer, self.clip_preprocess = _load_clip(clip_dir, self.device)
        if dino_dir:
            from fastfair.losses import load_semantic_encoder

            self.dino = load_semantic_encoder("dinov2", str(dino_dir), device=self.device)
        self.encoders = dict(semantics.encoders.items()) if semantics is not None else {}
        for encoder in self.encoders.values():
            encoder.to(self.device)

    @property
    def diversity_encoder(self) -> Optional[str]:
        """The embedding diversity is measured in (`diversity_model`)."""
        return diversity_model(self.dino, self.encoders, self.clip)[0]

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(images[i:i + self.batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(images), self.batch_size)])

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> Dict[str, np.ndarray]:
        """{attribute: [N] class index of the largest face's crop, NO_FACE where no face was found}."""
        from fastfair.faces import crop_boxes, locate_faces

        regions = locate_faces(images, self.detector, self.margin)
        found = regions.found.cpu().numpy()
        labels, logits = {}, {}
        for name, classifier in self.classifiers.items():
            if id(classifier) not in logits:  # one forward per classifier, however many attributes it has
                crops = crop_boxes(images, regions.crop_boxes.to(images.device), classifier.input_size,
                                   antialias=getattr(classifier, "antialias", True))
                logits[id(classifier)] = classifier.head.split(self._batched(classifier, crops))
            predicted = logits[id(classifier)][name].argmax(-1).numpy()
            labels[name] = np.where(found, predicted, NO_FACE)
        return labels

    def _clip_images(self, images):
        return self._batched(lambda x: _features(self.clip.get_image_features(
            pixel_values=self.clip_preprocess(x))), images)

    @torch.no_grad()
    def _clip_text(self, prompt: str) -> torch.Tensor:
        tokens = self.clip_tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt")
        return _features(self.clip.get_text_features(**tokens.to(self.device))).float().cpu()

    def embed(self, images: torch.Tensor) -> "Embeddings":
        """The images [N, 3, H, W] in [-1, 1] under each semantic model this scorer holds."""
        return Embeddings(dino=self._batched(self.dino, images) if self.dino is not None else None,
                          encoders={name: self._batched(encoder, images) for name, encoder in self.encoders.items()},
                          clip=self._clip_images(images) if self.clip is not None else None)

    def measure(self, images: torch.Tensor) -> "Measured":
        """What the scores of one model's images of a prompt [N, 3, H, W] are computed from (labels, embeddings);
        a sweep measures the shared base images once (`fastfair.evaluation.shared`)."""
        return Measured(len(images), self.labels(images), self.embed(images))

    def semantics(self, prompt: str, images: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
        """{model: {"clip_t", "diversity", and for "finetuned" also "clip_i", "dino", "sim_<encoder>"}} (NaN
        without the model that scores it) of images {model: [N, 3, H, W]} (base and finetuned paired by index)."""
        return self.semantic_scores(prompt, {model: self.embed(batch) for model, batch in images.items()})

    def semantic_scores(self, prompt: str, embedded: Dict[str, "Embeddings"]) -> Dict[str, Dict[str, float]]:
        """`semantics` from the models' embeddings {model: `embed`'s output}."""
        nan = float("nan")
        scores = {model: {"clip_t": nan, "diversity": nan} for model in embedded}
        if self.clip is not None:
            text = self._clip_text(prompt)
            for model, embeddings in embedded.items():
                scores[model]["clip_t"] = _cosine_mean(embeddings.clip, text)
        for model, embeddings in embedded.items():
            if embeddings.diversity is not None:
                scores[model]["diversity"] = pairwise_diversity(embeddings.diversity)
        if "finetuned" in embedded:
            tuned, base = embedded["finetuned"], embedded["base"]
            scores["finetuned"].update(
                clip_i=_cosine_mean(tuned.clip, base.clip) if self.clip is not None else nan,
                dino=_cosine_mean(tuned.dino, base.dino) if self.dino is not None else nan,
                **{f"sim_{name}": _cosine_mean(tuned.encoders[name], base.encoders[name]) for name in self.encoders})
        return scores

    def score_prompt(self, prompt: str, images: Dict[str, torch.Tensor], sets: Sequence[AttributeSet],
                     class_counts: Dict[str, int], counts: Optional[Dict[str, int]] = None) -> Dict[str, dict]:
        """{model: flat row} for one prompt's images {model: [N, 3, H, W] in [-1, 1]}; counts: {set name: its
        first images to score} (``images_per_set``; all N when absent)."""
        measured = {model: self.measure(batch) for model, batch in images.items()}
        return self.rows(prompt, measured, sets, class_counts, counts)

    def rows(self, prompt: str, measured: Dict[str, "Measured"], sets: Sequence[AttributeSet],
             class_counts: Dict[str, int], counts: Optional[Dict[str, int]] = None) -> Dict[str, dict]:
        """`score_prompt` from the models' measurements {model: `measure`'s output}."""
        semantics = self.semantic_scores(prompt, {model: m.embeddings for model, m in measured.items()})
        rows = {}
        for model, m in measured.items():
            row = {"num_images": m.num_images,
                   "no_face": int((next(iter(m.labels.values())) == NO_FACE).sum()) if m.labels else 0}
            for attribute_set in sets:
                row.update(set_metrics(m.labels, attribute_set, class_counts, (counts or {}).get(attribute_set.name)))
            rows[model] = {**row, **semantics[model]}
        return rows


@dataclass(frozen=True)
class Embeddings:
    """One model's images [N] under the scorer's semantic models: DINOv2 [N, D], the semantics model's encoders
    {name: [N, D]}, CLIP's image tower [N, D] (None without that model)."""

    dino: Optional[torch.Tensor]
    encoders: Dict[str, torch.Tensor]
    clip: Optional[torch.Tensor]

    @property
    def diversity(self) -> Optional[torch.Tensor]:
        """The embedding diversity is measured in (`diversity_model`)."""
        return diversity_model(self.dino, self.encoders, self.clip)[1]


def diversity_model(dino, encoders: dict, clip) -> tuple:
    """(name, item) of what diversity is measured in, of a scorer's models or of their embeddings: DINOv2, else
    the semantics model's first encoder, else CLIP; (None, None) without any."""
    if dino is not None:
        return "dinov2", dino
    if encoders:
        return next(iter(encoders.items()))
    return ("clip", clip) if clip is not None else (None, None)


@dataclass(frozen=True)
class Measured:
    """One model's images of a prompt as the scores see them: their count, {attribute: [N] labels} and
    embeddings."""

    num_images: int
    labels: Dict[str, np.ndarray]
    embeddings: Embeddings


def pairwise_diversity(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos over the ordered pairs i != j of embeddings [N, D]; NaN for fewer than two rows."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    unit = F.normalize(embeddings.double(), dim=-1)
    cosines = unit @ unit.T
    return float(1 - (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1)))


def _features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features as a tensor, 5.x as ``pooler_output``."""
    return output if torch.is_tensor(output) else output.pooler_output


def _load_clip(folder, device):
    """A full transformers CLIPModel (both towers) and its tokenizer from a local folder."""
    from transformers import CLIPModel, CLIPTokenizer

    from fastfair.losses.semantics import clip_preprocess

    config = Path(folder) / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if kind != "clip":  # e.g. a vision tower alone (clip_vision_model): CLIP-T needs the text tower too
        raise ValueError(f"--clip {folder}: expected a local transformers CLIPModel folder (config.json with "
                         f"model_type 'clip', both towers, and its tokenizer), found "
                         f"{f'model_type {kind!r}' if config.is_file() else 'no config.json'}")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer, clip_preprocess(str(folder), model.config.vision_config.image_size)


def load_classifiers(paths: Sequence[str], attributes: Optional[Sequence[str]] = None, device="cpu",
                     head_names: Optional[Sequence[str]] = None):
    """({attribute: classifier}, {attribute: class names}) from classifier files or 'package.module:function'
    factories (called with None, e.g. ``fastfair.toy:eval_classifier``); the first one that
    predicts an attribute judges it; attributes (default: all the files predict) selects and orders them.
    head_names: the attributes, in output order, of files without fastfair metadata (``head_from_names``)."""
    from fastfair.classifiers import head_from_names, load_classifier
    from fastfair.classifiers.model import describes_itself
    from fastfair.hooks import load_callable

    judges, classes = {}, {}
    for path in paths:
        if ":" in str(path) and not Path(path).exists():  # a factory, e.g. fastfair.toy:eval_classifier
            classifier = load_callable(str(path), "--classifier")(None)
        elif not Path(path).is_file():
            state = "is a folder, not a classifier file" if Path(path).is_dir() else "does not exist"
            raise ValueError(f"--classifier {path} {state}: give a classifier file (.safetensors from python -m "
                             "fastfair.classifiers.train, or the public code's .pt with --classifier-head)")
        elif head_names and not describes_itself(str(path)):
            try:
                head = head_from_names(head_names)
            except ValueError as error:
                raise ValueError(f"--classifier-head {','.join(head_names)}: {error}") from None
            classifier = load_classifier(str(path), head)
        else:
            classifier = load_classifier(str(path))
        classifier = classifier.to(device).eval().requires_grad_(False)
        for attribute in classifier.head.attributes:
            if attribute.name not in judges:
                judges[attribute.name], classes[attribute.name] = classifier, attribute.classes
    wanted = list(attributes) if attributes else list(judges)
    unknown = [name for name in wanted if name not in judges]
    if unknown:
        raise ValueError(f"--attributes: no classifier predicts {unknown}; the classifiers predict {list(judges)}")
    return {name: judges[name] for name in wanted}, {name: classes[name] for name in wanted}
