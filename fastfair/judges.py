"""The frozen models that judge a training run's images (seed paragraphs 0105-0109): the attribute classifiers,
the face detector, the semantics encoders and the face embedding with its bank, built from a config and stored in
the autocast dtype they compute in; and the check of the targets against a classifier file's own class layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn

from fastfair.config import TrainConfig
from fastfair.hooks import call_hook
from fastfair.models import torch_dtype


@dataclass
class Judges:
    """Frozen models that score images: classifiers by attribute, face detector, semantics, face embedding."""

    classifiers: Dict[str, nn.Module]  # attribute name -> classifier whose logits hold its indices
    detector: object
    semantics: nn.Module
    face_embedder: Optional[nn.Module]
    face_bank: Optional[object]


def _classifier(name, spec, device):
    from fastfair.classifiers import load_classifier
    from fastfair.classifiers.heads import output_head
    from fastfair.classifiers.model import describes_itself, file_outputs

    if spec.factory:
        key = f"classifiers.{name}.factory"
        module = call_hook(spec.factory, key, (spec,), "factory(spec) -> a torch.nn.Module, images -> logits")
        missing = [what for what, present in (
            ("an nn.Module", isinstance(module, nn.Module)),
            ("input_size (its image side)", hasattr(module, "input_size")),
            ("head, or classifiers.<n>.attributes set", spec.attributes or hasattr(module, "head"))) if not present]
        if missing:
            raise ValueError(f"{key}={spec.factory!r} returned a {type(module).__name__}, which lacks "
                             f"{'; '.join(missing)}: a classifier factory returns an nn.Module mapping images "
                             "[N, 3, S, S] in [-1, 1] to logits, with .input_size = S and .head (its attributes' "
                             "outputs; or give classifiers.<n>.attributes)")
    else:  # a file without fastfair's metadata (e.g. the public code's .pt): its outputs as the config maps them
        head = None
        if spec.attributes and not describes_itself(spec.path):
            count = file_outputs(spec.path, spec.architecture)
            for attribute, indices in spec.attributes.items():
                beyond = [i for i in indices if i >= count]
                if beyond:  # read, they would fail mid-run; declared but unread, they would misdescribe the file
                    raise ValueError(f"classifiers.{name}.attributes.{attribute}: {spec.path} has {count} outputs "
                                     f"(0-{count - 1}), so it has no outputs {beyond}: give the indices of its "
                                     "outputs that hold each attribute, or leave out an attribute it does not predict")
            head = output_head(count)
        module = load_classifier(spec.path, head, arch=spec.architecture, input_size=spec.input_size)
    return module.to(device).eval().requires_grad_(False)


def build_judges(cfg: TrainConfig, device) -> Judges:
    from fastfair.faces import FaceBank, get_detector, load_face_embedder
    from fastfair.faces.embed import as_face_embedder
    from fastfair.faces.detect import detector_from_flags, detector_hook
    from fastfair.losses import SemanticsLoss

    # frozen, and run inside the trainer's autocast, which computes in the half dtype anyway: stored in it, as the
    # frozen model parts are (CLIP ViT-H/14 alone: 2.4 GiB in fp32)
    judge_dtype = torch_dtype(cfg.precision.mixed)
    classifiers, owners = {}, {}
    for name, spec in cfg.classifiers.items():
        module = _classifier(name, spec, device).to(judge_dtype)
        attributes = spec.attributes or [a.name for a in module.head.attributes]
        for attribute in attributes:  # validate sees the declared ones; a file that describes itself, only here
            if attribute in owners:
                raise ValueError(f"classifiers.{owners[attribute]} and classifiers.{name} both predict '{attribute}': "
                                 "name the attributes each one gives (classifiers.<name>.attributes), "
                                 f"'{attribute}' in one of them")
            owners[attribute] = name
            classifiers[attribute] = module
    faces = cfg.faces
    if faces.detector == "callable":
        detector = get_detector(detector_hook(faces.detector_fn, "faces.detector_fn"))
    else:  # one backend, or a list tried in order per image (FallbackDetector); insightface with its model root
        detector = get_detector(detector_from_flags(faces.detector, faces.detector_path))
    sem = cfg.semantics
    if sem.factory:  # frozen and in eval mode, as every judge: batch statistics and dropout would make the loss of
        # an image depend on the others in its batch, and the encoders would collect gradients
        semantics = call_hook(sem.factory, "semantics.factory", (sem,), "factory(settings) -> a semantics loss module")
        if not (isinstance(semantics, nn.Module) and hasattr(semantics, "embed_originals")):
            raise ValueError(f"semantics.factory={sem.factory!r} returned a {type(semantics).__name__}: expected an "
                             "nn.Module with embed_originals(originals) -> embeddings and forward(images, "
                             "embeddings) -> {name: [N] losses}, as fastfair.losses.SemanticsLoss")
        semantics = semantics.to(device, judge_dtype).eval()
        semantics.requires_grad_(False)
    else:
        clip = ({"backend": "open_clip", "model_name": sem.clip_model, "checkpoint": sem.clip_path}
                if sem.clip_backend == "open_clip" else {"backend": "clip", "path": sem.clip_path})
        semantics = SemanticsLoss.from_config({"clip": clip, "dino": {"backend": "dinov2", "path": sem.dino_path}},
                                              device=device, dtype=judge_dtype)
    use_face = cfg.loss.face_loss and cfg.loss.lambda_face > 0
    embedder = bank = None
    if use_face:
        bank = FaceBank.load(faces.bank, device=device)
        flip = bank.flip
        if faces.embedding_fn:
            embedder = call_hook(faces.embedding_fn, "faces.embedding_fn", (), "factory() -> a face embedder")
            if flip is not None:  # a bare network, as build_bank's --embedder-factory gives (so the factory a
                # bank records serves here too), is embedded as build_bank did
                embedder = as_face_embedder(embedder, flip)
            if flip is not None and embedder.flip != flip:
                raise ValueError(f"faces.embedding_fn={faces.embedding_fn} embeds with flip={embedder.flip}, but the "
                                 f"faces.bank {faces.bank} was built with flip={flip}: the face loss would compare "
                                 "embeddings made two ways; rebuild the bank or change the embedder")
        else:  # as the bank was built (python -m fastfair.faces.build_bank records --no-flip)
            embedder = load_face_embedder(faces.embedding, flip=True if flip is None else flip)
        embedder = embedder.to(device).eval().requires_grad_(False)
        # now, not at the first iteration: an embedder of another dimension, or another one than the bank records
        bank.check_embedder(embedder, faces.bank, faces.embedding_fn, faces.embedding)
        embedder = embedder.to(dtype=judge_dtype)
    return Judges(classifiers, detector, semantics, embedder, bank)


def head_disagreements(attribute, head) -> List[str]:
    """Where a target attribute's output indices contradict its classifier file's own layout (fastfair classifier
    files name each attribute's outputs and classes: fastfair.classifiers.heads; a file without names, read through
    classifiers.<n>.attributes, has none to contradict): an index outside the attribute's outputs, a class the file
    does not name, or a class reading the output of another class of the same name."""
    if head is None or attribute.name not in getattr(head, "slices", {}):
        return []
    span, names = head.slices[attribute.name], head.classes(attribute.name)
    layout = ", ".join(f"{name}: {span.start + i}" for i, name in enumerate(names))
    where = f"targets attribute {attribute.name!r}"
    outside = [i for i in attribute.indices if not span.start <= i < span.stop]
    if outside:
        return [f"{where} reads outputs {outside}, outside the file's {attribute.name} outputs ({layout})"]
    # another spelling ('Old' for 'old') would skip the name check below and read the outputs by index alone,
    # swapped or not
    unnamed = [name for name in attribute.classes if name not in names]
    if unnamed:
        return [f"{where}: classes {unnamed} are not the file's {attribute.name} classes ({layout}): name each "
                f"class as the file does"]
    return [f"{where}: class {name!r} reads output {index}, but the file's {name!r} is output "
            f"{span.start + names.index(name)} ({layout})"
            for name, index in zip(attribute.classes, attribute.indices)
            if name in names and index != span.start + names.index(name)]
