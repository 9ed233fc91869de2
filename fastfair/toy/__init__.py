"""The toy world: a tiny, deliberately biased text-to-image model on which fastfair runs end to end on CPU.

- ``world``: procedural 32x32 portraits with visible gender / race / age cues and nuisance variation;
- ``captions``: occupations and sports, each with its own skewed attribute distribution; train and
  held-out concepts are disjoint;
- ``models`` + ``build``: an SD 1.x-shaped model (CLIP text encoder, U-Net, AutoencoderKL,
  DPM-Solver++) trained by ``python -m fastfair.toy.build``, shipped as a diffusers folder;
- ``classifiers`` (``train`` for the alignment loss, ``eval`` for evaluation), ``detector``, ``face_bank``.

    pipeline = load_toy_pipeline()                  # StableDiffusionPipeline, 32x32 images
    classifier = load_toy_classifier("eval")        # crops -> logits [gender 2 | race 4 | age 2]
    detector = load_toy_detector()                  # images -> per image [(x0, y0, x1, y1, score)]
    bank, embedder = load_toy_face_bank(), toy_face_embedder()

Every loader takes ``weights_dir`` (default: the package's ``weights`` folder) to use another build.
Config hooks (``package.module:function`` strings, see configs/toy.yaml) for the shipped weights:
``fastfair.toy:detect_faces`` (a callable face detector), ``fastfair.toy:train_classifier`` and
``fastfair.toy:eval_classifier`` (classifier factories), ``fastfair.toy:toy_face_embedder``,
``fastfair.toy:toy_semantics`` (the semantics loss's encoders), ``fastfair.toy:occupation_prompts``.
"""
import functools
from typing import Optional

from fastfair.toy.captions import CONCEPTS, concepts, prompts
from fastfair.toy.classifiers import load_toy_classifier
from fastfair.toy.detector import load_toy_detector
from fastfair.toy.face_bank import load_toy_face_bank, toy_face_embedder
from fastfair.toy.semantics import toy_semantics
from fastfair.toy.files import PIPELINE, WEIGHTS_DIR, weights_path
from fastfair.toy.world import ATTRIBUTES, draw_random_portraits


def toy_pipeline_path(weights_dir: Optional[str] = None) -> str:
    """The diffusers folder of the toy model (pass it wherever an SD model path goes)."""
    return weights_path(PIPELINE, weights_dir)


def load_toy_pipeline(weights_dir: Optional[str] = None, dtype=None):
    """The toy ``StableDiffusionPipeline``, loaded the way real weights load."""
    from fastfair.toy.models import load_pipeline

    return load_pipeline(toy_pipeline_path(weights_dir), dtype)


@functools.lru_cache(maxsize=1)
def _shipped_detector():
    return load_toy_detector()


def detect_faces(images):
    """The shipped toy detector on images [N, 3, H, W] in [-1, 1] (-> N lists) or one uint8 array [H, W, 3]
    (-> its list) of (x0, y0, x1, y1, score); loaded once."""
    return _shipped_detector()(images)


def occupation_prompts(split: str = "train"):
    """Prompt-set factory (``data.sets.<name>.factory``): the toy occupations of a split; the trainer's "test"
    is the toy world's held-out split."""
    if split not in ("train", "test", "heldout"):
        raise ValueError(f"split {split!r}: the toy occupations have the splits 'train' and 'test' (also called "
                         "'heldout')")
    return prompts({"test": "heldout"}.get(split, split), "occupation")


def train_classifier(spec=None):
    """Classifier factory: the shipped ``train`` classifier (``spec``, e.g. a trainer config entry, is unused)."""
    return load_toy_classifier("train")


def eval_classifier(spec=None):
    """Classifier factory: the shipped ``eval`` classifier (``spec`` is unused)."""
    return load_toy_classifier("eval")


__all__ = ["ATTRIBUTES", "CONCEPTS", "WEIGHTS_DIR", "concepts", "detect_faces", "draw_random_portraits",
           "eval_classifier", "load_toy_classifier", "load_toy_detector", "load_toy_face_bank", "load_toy_pipeline",
           "occupation_prompts", "prompts", "toy_face_embedder", "toy_pipeline_path", "toy_semantics", "train_classifier"]
