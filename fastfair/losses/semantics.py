"""Image semantics preserving loss (seed paragraph 0107, Eq. 7).

    L_img,i = sum over encoders E in {CLIP, DINO} of  1 - cos(E(x_i), E(o_i))

x_i: the finetuned model's image, o_i: the frozen model's image from the same noise. The encoders are
frozen and in eval mode; the originals are embedded without a graph. Images enter in [-1, 1]
([N, 3, H, W]) and are preprocessed in torch, differentiably: resize of the shortest edge (bicubic or
bilinear, antialiased), center crop, normalization with the model's own mean/std.

Backends (local files only, never a hub):
- "clip": transformers `CLIPVisionModelWithProjection` from a local directory (`image_embeds`);
- "open_clip": an open_clip model name (e.g. ViT-H-14) and a local checkpoint file;
- "dinov2": transformers `Dinov2Model` from a local directory (the CLS token after the final norm,
  `pooler_output`, the public DINOv2 image feature).
Preprocessing comes from the directory's preprocessor_config.json when present, else from the
processors' defaults: CLIP mean/std at the model's image size; DINOv2 ImageNet mean/std, crop 224. DINOv2's
shortest edge goes to its crop size, not to its processor's resize (256), so that a square image is compared whole
(the public code's way).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fastfair.optional import MissingPackage

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("clip", "open_clip", "dinov2")
SPEC_FIELDS = {"backend", "path", "model_name", "checkpoint", "load_in_8bit"}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Preprocess:
    """[-1, 1] images [N, 3, H, W] -> model input [N, 3, crop_h, crop_w] (float32), differentiable."""

    resize: int  # target length of the shortest edge
    crop: tuple  # (height, width)
    mean: tuple
    std: tuple
    mode: str = "bicubic"

    def __post_init__(self):
        if self.mode not in _PIL_RESAMPLE.values():
            raise ValueError(f"Preprocess.mode must be one of {sorted(_PIL_RESAMPLE.values())}, got {self.mode!r}")
        if self.resize < max(self.crop):
            raise ValueError(f"Preprocess: resize ({self.resize}) must be >= the crop size {self.crop}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        # the same output size as transformers' shortest-edge resize
        size = (self.resize, int(self.resize * w / h)) if h <= w else (int(self.resize * h / w), self.resize)
        if size != (h, w):
            smooth = self.mode != "nearest"
            x = F.interpolate(x, size=size, mode=self.mode, antialias=smooth,
                              **({"align_corners": False} if smooth else {}))
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean = x.new_tensor(self.mean)[:, None, None]
        std = x.new_tensor(self.std)[:, None, None]
        return (x - mean) / std


class SemanticEncoder(nn.Module):
    """A frozen image encoder with its preprocessing: [-1, 1] images [N, 3, H, W] -> [N, D] float32."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, embed):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.preprocess = preprocess
        self._embed = embed  # (model, pixel_values) -> [N, D]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: stays in eval mode whatever the trainer asks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)  # not int8
        pixels = self.preprocess(images).to(dtype)
        return self._embed(self.model, pixels).float()


class SemanticsLoss(nn.Module):
    """Per-image 1 - cos of each encoder's embeddings (seed Eq. 7, before the mean over images)."""

    def __init__(self, encoders: dict):
        super().__init__()
        if not encoders:
            raise ValueError("SemanticsLoss needs at least one encoder, e.g. {'clip': ..., 'dino': ...}")
        self.encoders = nn.ModuleDict(encoders)

    @classmethod
    def from_config(cls, config: dict, dtype=torch.float32, device="cpu") -> "SemanticsLoss":
        """config: {name: {backend, path | model_name + checkpoint, load_in_8bit}} per encoder."""
        if not isinstance(config, dict) or not config:
            raise ValueError("semantics config: a mapping {name: {backend: ..., ...}} with at least one encoder")
        for name, spec in config.items():
            if not isinstance(spec, dict) or set(spec) - SPEC_FIELDS:
                raise ValueError(f"semantics config {name!r}: a mapping with fields from {sorted(SPEC_FIELDS)}, "
                                 f"got {spec!r}")
        return cls({name: load_semantic_encoder(**spec, dtype=dtype, device=device) for name, spec in config.items()})

    @torch.no_grad()
    def embed_originals(self, originals: torch.Tensor) -> dict:
        """Unit embeddings {name: [N, D]} of the frozen model's images; no graph is kept."""
        return {name: F.normalize(encoder(originals), dim=-1) for name, encoder in self.encoders.items()}

    def forward(self, images: torch.Tensor, original_embeddings: dict) -> dict:
        """{name: [N]} 1 - cos(E(images_i), E(originals_i)); sum them for Eq. 7's bracket."""
        losses = {}
        for name, encoder in self.encoders.items():
            embedded = F.normalize(encoder(images), dim=-1)
            if embedded.shape != original_embeddings[name].shape:  # else one image broadcast against N originals
                raise ValueError(f"semantics {name!r}: {tuple(embedded.shape)} embeddings of the images against "
                                 f"{tuple(original_embeddings[name].shape)} of the originals: pair each image with "
                                 "its original")
            losses[name] = 1 - (embedded * original_embeddings[name]).sum(-1)
        return losses


def load_semantic_encoder(backend, path=None, model_name=None, checkpoint=None, dtype=torch.float32,
                          device="cpu", load_in_8bit=False) -> SemanticEncoder:
    """A frozen encoder from local files. backend "clip" or "dinov2": `path` is a transformers model
    directory; backend "open_clip": `model_name` (e.g. "ViT-H-14") and `checkpoint`, a local file."""
    if backend not in BACKENDS:
        raise ValueError(f"semantic encoder backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "open_clip":
        if load_in_8bit:
            raise ValueError("load_in_8bit is supported for the transformers backends only")
        return _load_open_clip(model_name, checkpoint, dtype, device)
    if path is None or not os.path.isdir(path):
        raise ValueError(f"backend {backend!r} needs `path`, a local model directory; got {path!r}")
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    model_class = CLIPVisionModelWithProjection if backend == "clip" else Dinov2Model
    kwargs = _load_kwargs(dtype, load_in_8bit, device)
    if backend == "clip":
        kwargs.update(_clip_vision_config(path))
    model = model_class.from_pretrained(path, local_files_only=True, **kwargs)
    if not load_in_8bit:
        model = model.to(device)
    if backend == "clip":
        preprocess = clip_preprocess(path, model.config.image_size)
        return SemanticEncoder(model, preprocess, lambda m, x: m(pixel_values=x).image_embeds)
    processor = _read_json(os.path.join(path, "preprocessor_config.json"))
    preprocess = _preprocess_from(processor, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
    # Eq. 7 compares whole images: the shortest edge goes to the crop size, so a square image is seen whole (the
    # processor's 256 -> 224 centre crop would leave 23% of it, its border, out of the loss), as the public code
    # fed DINO
    preprocess = replace(preprocess, resize=max(preprocess.crop))
    return SemanticEncoder(model, preprocess, lambda m, x: m(pixel_values=x).pooler_output)


def _clip_vision_config(path: str) -> dict:
    """For a full CLIPModel folder (both towers, e.g. laion/CLIP-ViT-H-14's), the vision config with the
    model's own projection_dim: the nested vision_config carries the default (512), and loading the vision tower
    with it would silently re-initialize a wrongly sized image projection."""
    config = _read_json(os.path.join(path, "config.json")) or {}
    if config.get("model_type") != "clip":
        return {}
    from transformers import CLIPVisionConfig

    vision = dict(config.get("vision_config") or {})
    vision["projection_dim"] = config.get("projection_dim", vision.get("projection_dim", 512))
    return {"config": CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})}


def _load_kwargs(dtype, load_in_8bit, device):
    import transformers
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56
    kwargs = {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
    if load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise MissingPackage("load_in_8bit needs bitsandbytes: pip install 'fastfair[quant]'") from err
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes while placing the weights
    return kwargs


def clip_preprocess(path: str, size: int) -> Preprocess:
    """The differentiable preprocessing of a local transformers CLIP folder (its preprocessor_config.json, else
    OpenAI CLIP's mean/std) at the model's image size."""
    processor = _read_json(os.path.join(path, "preprocessor_config.json"))
    return _preprocess_from(processor, size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _read_json(file):
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def _preprocess_from(processor, resize, crop, mean, std) -> Preprocess:
    """Preprocess from a transformers preprocessor_config.json dict, with the given defaults."""
    size = processor.get("size", resize)
    if isinstance(size, dict):
        size = size.get("shortest_edge", min(size.get("height", resize), size.get("width", resize)))
    crop_size = processor.get("crop_size", crop) if processor.get("do_center_crop", True) else size
    if isinstance(crop_size, dict):
        crop_size = (crop_size["height"], crop_size["width"])
    elif isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    resample = processor.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"preprocessor_config.json: resample={resample} is not supported "
                         f"(supported: {sorted(_PIL_RESAMPLE)}, PIL codes)")
    return Preprocess(int(size), tuple(crop_size), tuple(processor.get("image_mean", mean)),
                      tuple(processor.get("image_std", std)), _PIL_RESAMPLE[resample])


def _load_open_clip(model_name, checkpoint, dtype, device) -> SemanticEncoder:
    if not model_name or checkpoint is None or not os.path.isfile(checkpoint):
        raise ValueError(f"backend 'open_clip' needs model_name (e.g. 'ViT-H-14') and checkpoint, a local "
                         f"file; got model_name={model_name!r}, checkpoint={checkpoint!r}")
    if ":" in model_name:  # open_clip would load 'hf-hub:' / 'local-dir:' names from there, ignoring checkpoint
        raise ValueError(f"backend 'open_clip': model_name must be a built-in open_clip name such as 'ViT-H-14', "
                         f"not a schema like 'hf-hub:'; got {model_name!r}")
    try:
        import open_clip
    except Exception as err:  # ImportError, or torchvision failing to import beside this torch
        raise MissingPackage("backend 'open_clip' needs open_clip_torch and an importable torchvision: "
                             "pip install 'fastfair[clip]', or use backend 'clip' with a transformers "
                             f"directory ({type(err).__name__}: {err})") from err
    # an absolute path is never taken for a pretrained tag (a tag would be downloaded)
    model = open_clip.create_model(model_name, pretrained=os.path.abspath(checkpoint), device=device)
    visual = model.visual.to(dtype)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    if cfg.get("resize_mode", "shortest") != "shortest" or size[0] != size[1]:
        raise ValueError(f"open_clip model {model_name!r}: only square inputs resized by the shortest edge are "
                         f"supported, got size={size}, resize_mode={cfg.get('resize_mode')!r}")
    mean = cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
    std = cfg.get("std", getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
    # as open_clip's eval transform: bilinear if asked, else bicubic ('random' is a training-only choice)
    mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    preprocess = Preprocess(size[0], size, tuple(mean), tuple(std), mode)
    return SemanticEncoder(visual, preprocess, lambda m, x: m(x))
