"""Typed configuration of a training run: a dataclass tree, YAML loading, overrides, validation.

``load_config(path, overrides)``:

1. reads the YAML file (a path, or ``pkg://package/file.yaml`` for one shipped in a package); its optional
   ``base:`` (one path or a list, relative to the file, or ``pkg://``) names files
   loaded first (recursively) and merged *under* the file's own keys: mappings merge key by key,
   anything else (lists included) is replaced;
2. applies ``key.sub=value`` overrides, each replacing the value at its key; the value is parsed with
   ``yaml.safe_load`` (so ``[19,23]``, ``null``, ``true``, ``{a: 1}`` work), except that a field typed
   ``str`` keeps the text as typed (``output_dir=2024``, ``output_dir=runs/my run #2``; quoted: read as YAML
   reads a quoted string; ``null`` for an optional one);
3. converts the result to `TrainConfig`, checking every value against its field's type and rejecting
   unknown keys at any depth with a did-you-mean that names the full dotted key.

``validate(cfg, world_size, device)`` checks values (enums, counts, ranges, device support) and
``check_files(cfg)`` checks the local weight paths and ``check_packages(cfg)`` the optional packages the settings
need; each raises one `ConfigError` listing every problem.
``save_config`` writes the resolved YAML atomically.

DeepSpeed JSONs (``configs/ds/*.json``) hold concrete values; ``deepspeed_config(cfg, world_size)``
loads one and overrides what the run decides: ``train_micro_batch_size_per_gpu`` (images per rank),
``gradient_accumulation_steps`` (1), ``train_batch_size`` (images per prompt), ``gradient_clipping``
(``optim.grad_clip``) and, when set, ``zero_optimization.stage`` (``deepspeed.zero_stage``).
"""
import collections.abc
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from fastfair.hooks import resolve_package_path
from fastfair.prompts import list_prompt_sets, template_field

DTYPES = ("fp32", "fp16", "bf16")
FACE_MARGIN = 0.5  # faces.margin's default and python -m fastfair.evaluate --margin's: train as judged
FINETUNE_TARGETS = ("prefix", "text_lora", "unet_lora", "text_unet_lora", "unet_full")
PREFIX_INITS = ("mean", "random_tokens")
DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
EXPECTED_MODEL_LAYOUT = (
    "a diffusers folder with " + ", ".join(f"{name}/" for name in DIFFUSERS_SUBFOLDERS)
    + " (as save_pretrained writes it) or a single Stable Diffusion checkpoint file ("
    + "/".join(CHECKPOINT_SUFFIXES) + ")"
)
SINGLE_FILE_CONFIG_LAYOUT = (
    "a local diffusers folder of the checkpoint's architecture (model_index.json and "
    + ", ".join(f"{name}/" for name in DIFFUSERS_SUBFOLDERS)
    + " with their configs, as save_pretrained writes them; its weights are not read)"
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted key and the fix."""


class _NotFinite(ConfigError):
    """inf or NaN where a number is expected."""


def setting(default, *, choices=None, min=None, max=None, gt=None, lt=None):
    """A dataclass field with value constraints that `validate` checks (bounds are inclusive except gt/lt)."""
    limits = {name: value for name, value in
              (("choices", choices), ("min", min), ("max", max), ("gt", gt), ("lt", lt)) if value is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=limits)
    return field(default=default, metadata=limits)


@dataclass
class ModelConfig:
    pretrained: str = ""  # local only: EXPECTED_MODEL_LAYOUT
    # a single-file model.pretrained's architecture: a local diffusers folder whose unet/vae/text_encoder/
    # tokenizer/scheduler configs describe it (SINGLE_FILE_CONFIG_LAYOUT); unused for a diffusers folder
    config: Optional[str] = None
    dtype: str = setting("fp16", choices=DTYPES)  # frozen weights (seed 0119: float16)
    attention: str = setting("sdpa", choices=("sdpa", "xformers"))
    resolution: Optional[int] = setting(None, gt=0)  # image side in pixels; null: the model's own


@dataclass
class LoraConfig:
    rank: int = setting(50, min=1)
    alpha: Optional[float] = setting(None, gt=0)  # null: alpha = rank (scale 1)
    dropout: float = 0.0  # only 0 runs (validate says why); the key stays so configs that state it load
    text_modules: List[str] = setting(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    unet_modules: List[str] = setting(["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class FinetuneConfig:
    target: str = setting("text_lora", choices=FINETUNE_TARGETS)
    prefix_tokens: int = setting(5, min=1)  # soft tokens prepended to the positive prompt (target=prefix)
    # their start: N copies of the vocabulary's mean row, or N distinct random tokens' rows (the public prefix
    # script's; drawn from the run's seed)
    prefix_init: str = setting("mean", choices=PREFIX_INITS)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SamplerConfig:
    # training's step count; with num_steps_range, which replaces it in training, the count within the range that
    # the run's export records (python -m fastfair.generate's default) and python -m fastfair.demo evaluates at
    num_steps: int = setting(20, min=1)
    num_steps_range: Optional[List[int]] = None  # [low, high], drawn per iteration; replaces num_steps in training
    # 1: no classifier-free guidance; below 1 is refused, as diffusers' pipeline (python -m fastfair.generate, the
    # export's users) samples every scale <= 1 without guidance: the run could not be reproduced there
    guidance_scale: float = setting(7.5, min=1)
    coefficients: str = setting("paper", choices=("paper", "exact", "none"))  # DESIGN.md "Adjustment coefficients"
    recompute_chunk: int = setting(1, min=1)  # steps per U-Net call in the backward recompute
    # images per U-Net call in the backward recompute (null: all of a process's at once): its activations scale
    # with this instead of the batch; the same gradient, summed in another order
    recompute_images: Optional[int] = setting(None, min=1)
    keep_graph_steps: int = setting(0, min=0)  # steps whose graph is kept instead of recomputed
    keep_attention_steps: int = setting(0, min=0)  # further steps keeping their attention outputs only
    grad_steps: Optional[int] = setting(None, min=1)  # backpropagate K random steps scaled by S/K; null: all
    memory_budget_gb: Optional[float] = setting(None, gt=0)  # picks both keeps above from a memory budget
    lean_graph: bool = True  # frozen convs and GEGLU gates save less in graph-building calls; same gradients


@dataclass
class PromptSetConfig:
    weight: float = setting(1.0, min=0)  # mixture weight; 0 leaves the set out
    file: Optional[str] = None  # one line each; under a shipped set's name its items (e.g. occupations) put in
    #                             that set's template, under another a full prompt; null: the shipped set
    template: Optional[str] = None  # one {field}, e.g. "a person playing {sport}"; null: the set's own
    factory: Optional[str] = None  # "package.module:function"(split) -> a list of prompt strings, e.g. the toy's


@dataclass
class DataConfig:
    sets: Dict[str, PromptSetConfig] = field(default_factory=lambda: {"occupations": PromptSetConfig()})
    split: str = setting("train", choices=("train", "test"))


@dataclass
class BatchConfig:
    images_per_prompt: int = setting(24, min=1)  # N, the global batch of one iteration (seed 0121)

    def per_rank(self, world_size: int) -> int:
        """Images each rank generates; `validate` has checked the division is exact."""
        return self.images_per_prompt // world_size


LossWeight = Union[float, Dict[str, float]]  # one value, or one per attribute name (seed 0123)


@dataclass
class LossConfig:
    confidence_threshold: float = setting(0.8, min=0, max=1)  # C of the alignment loss
    # Monte Carlo draws of the target sample for Eq. 5 where exact enumeration is too large (e.g. race, K = 4, at
    # N = 32): a target entry's standard error falls as 1 / sqrt(draws), so 1024 halves that of 256
    ot_samples: int = setting(1024, min=1)
    face_loss: bool = True
    lambda_face: float = setting(1.0, min=0)
    lambda_img_1: LossWeight = 8.0  # target class agrees with the original image's class
    lambda_img_2: LossWeight = 1.6  # disagrees: outside the face region
    lambda_img_3: LossWeight = 0.32  # disagrees: inside the face region
    # an image without a face (only L_img, seed 0109, which gives no weight): null = the smallest lambda_img_2;
    # the public code's gender and race scripts use lambda_img_1, its gender x race script the smallest lambda_img_2
    lambda_img_no_face: Optional[float] = setting(None, min=0)
    # the face loss's target: the original image's own face where the original already shows the image's target
    # class of every attribute, each with at least this probability, so a face that needs no change keeps its
    # identity (the public code's practice: 0.9 for gender, 0.8 for gender x race, 0.75 with age); null: always
    # the nearest bank face, as Eq. 8 (seed 0108) reads
    original_face_confidence: Optional[float] = setting(0.9, min=0, max=1)
    # recompute the decoder's and the judges' activations in the backward instead of keeping them all at once
    # (fastfair.recompute): exact, less memory, one more forward of each
    recompute_judges: bool = True
    # images decoded and judged per call (null: a process's whole batch): with recompute_judges each slice is
    # rebuilt on its own in the backward, so that phase's activations are those of judge_images images
    judge_images: Optional[int] = setting(None, min=1)


@dataclass
class ClassifierConfig:
    """An attribute classifier. fastfair's classifier files describe themselves: leave the rest null/empty;
    other files (e.g. the public code's .pt) need architecture and attributes."""
    path: str = ""
    architecture: Optional[str] = None  # a fastfair.classifiers architecture, e.g. mobilenet_v3_large
    input_size: Optional[int] = setting(None, min=1)  # null: the file's (set: must agree with it), else 224
    attributes: Dict[str, List[int]] = field(default_factory=dict)  # attribute: its output indices
    factory: Optional[str] = None  # "package.module:function"(spec) -> a module images -> logits (e.g. the toy's)


# fastfair.classifiers.model.ARCHITECTURES' names (kept here, torch-free, for validation)
CLASSIFIER_ARCHITECTURES = ("mobilenet_v3_large", "small_cnn")
# the face detector backends fastfair.faces.get_detector builds by name (kept here, torch-free, for validation)
DETECTOR_BACKENDS = ("opencv", "insightface", "mtcnn", "none")
FACE_DETECTORS = DETECTOR_BACKENDS + ("callable",)  # faces.detector's values; callable: faces.detector_fn


def detector_names(spec: str) -> List[str]:
    """A detector setting's entries in order ('insightface, mtcnn' -> ['insightface', 'mtcnn']): faces.detector,
    or the --detector flag of evaluate and build_bank."""
    return [name.strip() for name in str(spec).split(",") if name.strip()]


@dataclass
class FacesConfig:
    # opencv | insightface | mtcnn | none (the whole image is the face: WholeImageDetector, cropped without margin)
    # | callable (faces.detector_fn), or a comma-separated list of the first four tried in order per image: the
    # public code's insightface with a fallback for the images it finds no face in is insightface,mtcnn
    detector: str = "opencv"
    detector_path: Optional[str] = None  # insightface: the local model folder
    detector_fn: Optional[str] = None  # detector=callable: "package.module:function"
    # the square crop box: the detector box's longer side grown by this fraction (0.5: the public code's expand_coef,
    # in training and evaluation; python -m fastfair.evaluate --margin defaults to it too); detector none: no margin
    margin: float = setting(FACE_MARGIN, min=0)
    bank: Optional[str] = None  # real-face embeddings (safetensors) for the face realism loss
    embedding: Optional[str] = None  # face embedding model checkpoint (SFNet-20 style)
    embedding_fn: Optional[str] = None  # or "package.module:function"() -> a FaceEmbedder (replaces embedding)


@dataclass
class SemanticsConfig:
    clip_backend: str = setting("open_clip", choices=("open_clip", "transformers"))
    clip_model: str = "ViT-H-14"  # open_clip architecture name
    clip_path: str = ""  # open_clip checkpoint file, or a transformers CLIP folder
    dino_path: str = ""  # transformers Dinov2Model folder
    factory: Optional[str] = None  # or "package.module:function"(this config) -> a SemanticsLoss (paths unused)


@dataclass
class OptimConfig:
    name: str = setting("adamw", choices=("adamw", "adamw8bit"))
    lr: float = setting(5e-5, gt=0)
    betas: List[float] = setting([0.9, 0.999])
    weight_decay: float = setting(0.01, min=0)
    eps: float = setting(1e-8, gt=0)
    grad_clip: Optional[float] = setting(None, gt=0)  # max global grad norm; null: no clipping
    # the EMA that export and evaluation use by default: the public code's (diffusers' EMAModel with its default
    # schedule, decay 0.996: d_t = min(decay, (1 + s) / (10 + s)) at the t = s + 1-th step; fastfair.ema.EMA).
    # 0: the weights themselves
    ema_decay: float = setting(0.996, min=0, lt=1)
    # that schedule's cap (1 + s) / (10 + s); false: d_t = decay from the first step. (EMAModel's own
    # use_ema_warmup=True is another, power-law, schedule, which the public code does not use)
    ema_warmup: bool = True
    scheduler: str = setting("constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = setting(0, min=0)


@dataclass
class PrecisionConfig:
    # autocast dtype; trainable weights stay fp32 (under DeepSpeed bf16/fp16 the model's copies, which checkpoints
    # save and the EMA averages, are in that dtype: DeepSpeed keeps the fp32 masters in its optimizer state, saved
    # in state.pt)
    mixed: str = setting("fp16", choices=DTYPES)
    tf32: bool = True  # TF32 matmuls on CUDA
    # fp16 (autocast or model.dtype) without DeepSpeed (whose JSON sets its own): the initial scale of a dynamic
    # loss scaler (torch.amp.GradScaler); the U-Net's fp16 gradients otherwise underflow to zero. null: no scaling
    loss_scale: Optional[float] = setting(2.0 ** 16, gt=0)


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None  # null: <output_dir>/tensorboard
    log_every: int = setting(10, min=1)
    image_every: int = setting(200, min=0)  # image grids every that many iterations; 0: never


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None  # a JSON like configs/ds/zero2_fp16.json; null: no DeepSpeed JSON
    zero_stage: Optional[int] = setting(None, choices=(0, 1, 2, 3))  # null: the JSON's own


@dataclass
class TrainConfig:
    output_dir: str = ""
    max_steps: int = setting(10000, min=1)
    checkpoint_every: int = setting(200, min=1)
    keep_last: int = setting(3, min=1)  # newest checkpoints kept
    keep_every: int = setting(0, min=0)  # also keep every M-th iteration's checkpoint; 0: none
    resume: str = "auto"  # "auto": latest checkpoint in output_dir if any; "": start fresh; or a path
    # settings a resume may change although the checkpoint was trained with other values (dotted keys, or a
    # section such as precision); optim.*, max_steps, checkpoint_every and logging.* may always change
    resume_allow: List[str] = setting([])
    seed: int = setting(0, min=0, max=2**32 - 1)  # per-iteration seeds are derived from it in 64 bits
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    targets: Dict[str, Any] = field(default_factory=dict)  # handed as is to fastfair.targets
    loss: LossConfig = field(default_factory=LossConfig)
    classifiers: Dict[str, ClassifierConfig] = field(default_factory=dict)
    faces: FacesConfig = field(default_factory=FacesConfig)
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ----------------------------------------------------------------------------- typed conversion

def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _schema_keys(tp, prefix: str = "") -> List[str]:
    """Every dotted key of the dataclass tree (keys under free-form mappings not included)."""
    keys = []
    for name, sub in typing.get_type_hints(tp).items():
        keys.append(_join(prefix, name))
        if dataclasses.is_dataclass(sub):
            keys += _schema_keys(sub, _join(prefix, name))
    return keys


# other names of settings, as other trainers call them: name -> the setting's own name
SYNONYMS = {"learning_rate": "lr", "model_path": "pretrained", "train_steps": "max_steps", "epochs": "max_steps",
            "batch_size": "images_per_prompt"}


def _setting_type(dotted: str):
    """The type of a dotted key of TrainConfig."""
    tp = TrainConfig
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _unknown_key(key: str, name: str, tp) -> ConfigError:
    """The error for key (dotted, ending in name) absent from dataclass tp, with a did-you-mean."""
    fields = list(typing.get_type_hints(tp))
    prefix = key[: -len(name)]
    # settings by their names (not sections: 'model.path' is no misplaced 'batch')
    leaves = {full.rsplit(".", 1)[-1]: full for full in _schema_keys(TrainConfig)
              if not dataclasses.is_dataclass(_setting_type(full))}
    by_case = {field.lower(): field for field in fields}
    close = ([by_case[str(name).lower()]] if str(name).lower() in by_case else  # optim.LR: difflib minds case
             difflib.get_close_matches(name, fields, n=1))
    if SYNONYMS.get(str(name).lower()) in leaves:  # another trainer's name for a setting
        guess = leaves[SYNONYMS[str(name).lower()]]
    elif close:
        guess = prefix + close[0]
    else:  # misplaced rather than misspelt, e.g. top-level `lr`: look for the name elsewhere in the tree
        close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.75)
        guess = leaves[close[0]] if close else None
    hint = f" did you mean '{guess}'?" if guess else ""
    return ConfigError(f"unknown config key '{key}':{hint} (keys here: {', '.join(fields)})")


def _convert(value, tp, key: str):
    """value (parsed YAML) checked against type tp and converted; errors name the dotted key."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'the config'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        for name in value:
            if name not in hints:
                raise _unknown_key(_join(key, name), str(name), tp)
        return tp(**{name: _convert(sub, hints[name], _join(key, name)) for name, sub in value.items()})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        not_finite = None
        for arm in args:
            if arm is not type(None):
                try:
                    return _convert(value, arm, key)
                except _NotFinite as error:  # the arm that reads a number names the problem best
                    not_finite = error
                except ConfigError:
                    continue
        if not_finite is not None:
            raise not_finite
    elif origin is list and isinstance(value, list):
        return [_convert(item, args[0], f"{key}[{index}]") for index, item in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_convert(name, args[0], key): _convert(sub, args[1], _join(key, name))
                for name, sub in value.items()}
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 (PyYAML) reads 5e-5 (no dot) as a string; accept what float() reads.
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):  # inf passes every bound, NaN fails them with a confusing message
                raise _NotFinite(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str and isinstance(value, str):
        return value
    hint = ""
    if tp is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            if float(value).is_integer():  # 1e3 (YAML 1.1 reads it as text) or 1000.0
                hint = f": write {int(float(value))}"
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")


def _field_type(path: List[str]):
    """The declared type at a dotted path of TrainConfig (Any below free-form mappings)."""
    tp, walked = TrainConfig, []
    for name in path:
        walked.append(name)
        if tp is Any:
            return Any
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if name not in hints:
                raise _unknown_key(".".join(walked), name, tp)
            tp = hints[name]
        elif _mapping_arm(tp) is not None:  # a mapping, or a per-attribute weight that may be one (LossWeight)
            tp = typing.get_args(_mapping_arm(tp))[1]
        else:
            raise ConfigError(f"'{'.'.join(walked[:-1])}' is {_type_name(tp)}: it has no key '{name}'")
    return tp


def _mapping_arm(tp):
    """tp's Dict type if tp is one or a Union with one (LossWeight), else None."""
    arms = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    return next((arm for arm in arms if typing.get_origin(arm) is dict), None)


def _accepts_str(tp) -> bool:
    return tp is str or (typing.get_origin(tp) is Union and str in typing.get_args(tp))


def _is_text(tp) -> bool:
    """A field typed str or Optional[str]: its override value is text, never a YAML number, list or mapping."""
    return tp is str or (typing.get_origin(tp) is Union and set(typing.get_args(tp)) == {str, type(None)})


def repeated_override(overrides) -> Optional[str]:
    """The refusal when a command line gives one key twice (None: each once): the last would win without a word,
    where a YAML file giving a key twice is refused."""
    keys = [text.split("=", 1)[0].strip() for text in overrides if "=" in text]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is None:
        return None
    given = ", ".join(text for text in overrides if text.split("=", 1)[0].strip() == twice)
    return f"{twice} is given {keys.count(twice)} times ({given}), and only the last would count: give it once"


def parse_override(text: str):
    """'a.b=value' -> (['a', 'b'], value): YAML-parsed, raw text for a str field, type-checked."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component in '{key}'")
    indices = [name for name in path if name.isdigit()]
    if indices:  # merged as a mapping key, it would replace the list with {'0': ...}
        where = ".".join(path[:path.index(indices[0])])
        if where and _mapping_arm(_field_type(where.split("."))) is not None:
            raise ConfigError(f"override {text!r}: {where} is a mapping keyed by name, not a list: give the name, "
                              f"e.g. {where}.NAME.{'.'.join(path[path.index(indices[0]) + 1:]) or 'KEY'}=...")
        raise ConfigError(f"override {text!r}: list items cannot be set by index ('{indices[0]}' after '{where}'); "
                          f"give the whole list, e.g. {where}=[...] in YAML flow style, or edit the YAML file")
    tp = _field_type(path)
    if _is_text(tp) and raw.strip()[:1] not in ("'", '"'):
        # the text as typed: YAML would cut `runs/my run #2` at its comment, make `runs/a: b` a mapping and
        # refuse `{occupation} at work`; only a null (for an optional field) is read as YAML reads it
        value = raw.strip()
        if type(None) in typing.get_args(tp) and value in ("", "~", "null", "Null", "NULL"):
            value = None
        if type(None) in typing.get_args(tp) and value in ("None", "none"):  # Python's null, not YAML's
            key = ".".join(path)  # (a file's text stays read as it was: saved runs' configs load as before)
            raise ConfigError(f"{key}={value}: read as the text '{value}' (a path named {value}); for none write "
                              f"{key}=null (or nothing after '='), for that name ./{value}")
        _convert(value, tp, ".".join(path))
        return path, value
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    except ConfigError as error:  # _Loader's refusals
        raise ConfigError(f"override {text!r}: {error}") from None
    if _accepts_str(tp) and not isinstance(value, (str, list, dict)):
        optional_null = value is None and type(None) in typing.get_args(tp)
        value = None if optional_null else raw  # `output_dir=2024` is a path, not a number
    _convert(value, tp, ".".join(path))
    return path, value


# ----------------------------------------------------------------------------- YAML files

def _merge(base: dict, top: dict) -> dict:
    """top over base: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for name, value in top.items():
        if value is None and isinstance(merged.get(name), dict):  # a section left empty (its keys commented out)
            value = {}
        both_maps = isinstance(value, dict) and isinstance(merged.get(name), dict)
        merged[name] = _merge(merged[name], value) if both_maps else value
    return merged


_INT_TAG = "tag:yaml.org,2002:int"


class _Loader(yaml.SafeLoader):
    """yaml.safe_load that refuses what it would silently read otherwise than meant: a key given twice in one
    mapping (PyYAML keeps the last: a repeated section drops the first) and an int that YAML 1.1 (PyYAML) and YAML
    1.2 read differently, a leading zero being octal (017 is 15) and colons base 60 (1:30 is 90). Refused rather than
    read as YAML 1.2 would: the same file would then mean one number here and another to other PyYAML readers."""

    def construct_mapping(self, node, deep=False):
        self._refuse_repeated_keys(node)
        # ints checked here, where their key is known; _construct_int: the rest
        for key_node, value_node in self._explicit(node):
            key, listed = self.construct_object(key_node, deep=True), isinstance(value_node, yaml.SequenceNode)
            for index, item in enumerate(value_node.value if listed else [value_node]):
                self._check_int(item, f"{f'{key}[{index}]' if listed else key} (line {item.start_mark.line + 1})")
        return super().construct_mapping(node, deep)

    def _refuse_repeated_keys(self, node) -> None:
        lines = {}
        for key_node, _ in self._explicit(node):
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):  # SafeConstructor's own error for it
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found unhashable key", key_node.start_mark)
            if key in lines:
                raise ConfigError(f"key {key!r} is given twice in one mapping (lines {lines[key]} and "
                                  f"{key_node.start_mark.line + 1}), and YAML keeps only the last: merge them into one")
            lines[key] = key_node.start_mark.line + 1

    @staticmethod
    def _explicit(node):
        """The mapping's own entries: a merge key (<<: *anchor) is SafeConstructor's to expand, and an entry
        written next to it overrides the merged one (not a repeat)."""
        return [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]

    def _check_int(self, node, where: str = "") -> None:
        """Refuse node if it is an int YAML 1.1 and 1.2 read differently; where: its key, for the message."""
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG):
            return
        text, value = node.value, yaml.SafeLoader.construct_yaml_int(self, node)
        where = f"{where}: " if where else ""
        if ":" in text:
            raise ConfigError(f"{where}{text} is read as {value} by YAML 1.1 (base 60) and as a text by YAML 1.2: "
                              f"write {value}, or quote '{text}' for a text")
        if re.fullmatch(r"[-+]?0[0-9_]+", text) and int(text.replace("_", ""), 10) != value:
            raise ConfigError(f"{where}{text} is read as {value} by YAML 1.1 (octal) and as "
                              f"{int(text.replace('_', ''), 10)} by YAML 1.2: write the one you mean without "
                              "the leading zero")

    def _construct_int(self, node):
        self._check_int(node)
        return yaml.SafeLoader.construct_yaml_int(self, node)


_Loader.add_constructor(_INT_TAG, _Loader._construct_int)
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _construct_float(loader, node):
    """A float, refused where YAML 1.1 reads it in base 60 (1:30.5 is 90.5 there, a text in YAML 1.2)."""
    if ":" in node.value:
        value = yaml.SafeLoader.construct_yaml_float(loader, node)
        raise ConfigError(f"{node.value} is read as {value} by YAML 1.1 (base 60) and as a text by YAML 1.2: write "
                          f"{value}, or quote '{node.value}' for a text")
    return yaml.SafeLoader.construct_yaml_float(loader, node)


_Loader.add_constructor(_FLOAT_TAG, _construct_float)


def _read_yaml(path: Path, including: tuple = ()) -> dict:
    """A YAML mapping with its `base:` files merged under it (recursively, cycles refused)."""
    path = path.resolve()
    if path in including:
        raise ConfigError(f"{path}: circular base: {' -> '.join(str(p) for p in including + (path,))}")
    if not path.is_file():
        via = f" (named by base: in {including[-1]})" if including else ""
        what = "a folder, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError(f"{what}: {path}{via}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    except ConfigError as error:  # _Loader's refusals
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    bases = data.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases  # `base:` left empty: none
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of them, got {bases!r}")
    merged = {}
    for base in bases:
        try:
            base_path = Path(resolve_package_path(os.path.expanduser(base), "base"))
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None
        merged = _merge(merged, _read_yaml(path.parent / base_path, including + (path,)))
    return _merge(merged, data)


def _path_fields(cfg: TrainConfig):
    """(object, attribute, dotted key) of every field that holds a local path the run reads."""
    yield cfg.model, "pretrained", "model.pretrained"
    yield cfg.model, "config", "model.config"
    for name, spec in cfg.classifiers.items():
        yield spec, "path", f"classifiers.{name}.path"
    for name, spec in cfg.data.sets.items():
        yield spec, "file", f"data.sets.{name}.file"
    for attribute in ("detector_path", "bank", "embedding"):
        yield cfg.faces, attribute, f"faces.{attribute}"
    for attribute in ("clip_path", "dino_path"):
        yield cfg.semantics, attribute, f"semantics.{attribute}"
    yield cfg.deepspeed, "config", "deepspeed.config"


def _local_path(value, key: str):
    """'pkg://package/path' -> the file's location in the installed package (fastfair.hooks); a relative path ->
    the absolute path from the current folder; '' and None unchanged."""
    value = resolve_package_path(value, key)
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value else value


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Make every path field absolute (`_local_path`; the shipped toy config names its weights with pkg://).
    A relative path is read from the folder the config is loaded in; made absolute there, the settings a run
    saves (config.yaml, each checkpoint's) name the same files wherever export, evaluation or a resume run."""
    for owner, attribute, key in _path_fields(cfg):
        setattr(owner, attribute, _local_path(getattr(owner, attribute), key))
    # the folders a run writes keep their relative form (a resume may move them), but a '~' means home, not a
    # folder named '~' under the current one
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if cfg.logging.tensorboard_dir:
        cfg.logging.tensorboard_dir = os.path.expanduser(cfg.logging.tensorboard_dir)
    if cfg.resume not in ("auto", ""):
        cfg.resume = os.path.expanduser(cfg.resume)
    return cfg


def load_config(path, overrides=()) -> TrainConfig:
    """Read a YAML config (with its bases), apply 'key.sub=value' overrides (a mapping value merges into a
    section of settings, as a base does; {} empties it), return a typed TrainConfig whose paths are absolute
    (`resolve_paths`: pkg:// resolved, relative ones from the current folder)."""
    data = _read_yaml(Path(resolve_package_path(os.path.expanduser(str(path)), "config")))
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, name in enumerate(keys[:-1]):
            if node.get(name) is None:
                node[name] = {}
            elif not isinstance(node[name], dict):  # e.g. a single loss weight: its key would replace it
                where = ".".join(keys[:depth + 1])
                raise ConfigError(f"override {text!r}: {where} is {node[name]!r}, not a mapping: give it "
                                  f"whole, e.g. {where}={{{keys[depth + 1]}: {value}, ...}}")
            node = node[name]
        # a mapping merges into a section of settings key by key, as a base file's does (it replaced the whole
        # section: the settings it left out went back to the defaults, not to the config's); {} empties it. A
        # mapping of the user's names (classifiers, data.sets, a classifier's attributes) is given whole
        both_maps = isinstance(value, dict) and value and isinstance(node.get(keys[-1]), dict) and \
            dataclasses.is_dataclass(_field_type(keys))
        node[keys[-1]] = _merge(node[keys[-1]], value) if both_maps else value
    try:
        return resolve_paths(_convert(data, TrainConfig, ""))
    except (ConfigError, ValueError) as error:
        raise ConfigError(f"{path} (with its bases and overrides): {error}") from None


def config_to_dict(cfg: TrainConfig) -> dict:
    """cfg as plain YAML data, as config.yaml reads back: a tuple (a config built in Python) as a list, so that a
    resume compares the values, not their types."""
    return _lists(dataclasses.asdict(cfg))


def _lists(node):
    if isinstance(node, dict):
        return {name: _lists(sub) for name, sub in node.items()}
    return [_lists(item) for item in node] if isinstance(node, (list, tuple)) else node


# what a resumed run may change without resume_allow: where it stops, how it logs, how often it saves, the
# optimizer settings it is documented to apply (optim.name too, which the trainer refuses itself: its state has
# another layout), and how prefix tokens start (the checkpoint's rows replace them). Not retention (keep_last,
# keep_every): a smaller one would prune checkpoints the run has kept.
RESUME_MAY_CHANGE = ("optim", "max_steps", "checkpoint_every", "logging", "resume", "resume_allow", "output_dir",
                     "finetune.prefix_init",
                     # how the same gradient is computed, traded between memory and time (a resume on a smaller
                     # GPU needs them changed): the results differ by float rounding only
                     "sampler.recompute_chunk", "sampler.recompute_images", "sampler.keep_graph_steps",
                     "sampler.keep_attention_steps", "sampler.memory_budget_gb", "sampler.lean_graph",
                     "loss.judge_images")


def _flat(node, key: str = "") -> Dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for name, sub in node.items() for k, v in _flat(sub, _join(key, name)).items()}
    return {key: node}


def _covered(key: str, prefixes) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def _section_saved(key: str, saved: Dict[str, Any]) -> bool:
    """Whether the saved settings hold the section `key` sits in (so a missing `key` is a setting added since)."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return any(name.startswith(section) for name in saved)


def describe_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    """resume_changes' result as 'key=now (trained with before), ...' for a message."""
    return ", ".join(f"{key}={now!r} (trained with {before!r})" for key, (before, now) in changes.items())


def resume_changes(saved: dict, cfg: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """{dotted key: (saved value, this run's value)} for the settings a resume of a run trained with `saved`
    (config_to_dict of its config) would change, leaving out RESUME_MAY_CHANGE and cfg.resume_allow. A setting the
    saved config lacks in a section it has (a fastfair version before the setting, which ran as its default) counts
    only where this run moves it off its default, and is reported as trained with the default; an entry new to a
    mapping (data.sets.sports where the run had none) is a change; a setting this fastfair no longer has is left
    out."""
    before, now = _flat(saved), _flat(config_to_dict(cfg))
    for _, _, key in _path_fields(cfg):  # settings saved before paths were made absolute: from the current folder
        if isinstance(before.get(key), str) and before[key]:
            before[key] = _local_path(before[key], key)
    defaults = _flat(config_to_dict(TrainConfig()))
    skip = RESUME_MAY_CHANGE + tuple(cfg.resume_allow)
    changes = {}
    for key in sorted(set(before) | set(now)):
        if _covered(key, skip) or before.get(key, "?") == now.get(key, "?"):
            continue
        if key not in now:
            try:
                _field_type(key.split("."))
            except ConfigError:
                continue  # a setting of an older fastfair
        elif key not in before and _section_saved(key, before) and key in defaults:
            if now[key] == defaults[key]:
                continue
            before[key] = defaults[key]
        changes[key] = (before.get(key, "(not set)"), now.get(key, "(not set)"))
    return changes


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as the YAML a run records (config.yaml) and `train.py --print-config` prints."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path) -> None:
    """Write the resolved config as YAML atomically, a plain file on disk (fastfair.files.write_text)."""
    from fastfair.files import write_text  # imports torch: not at this module's import

    write_text(path, config_yaml(cfg))


# ----------------------------------------------------------------------------- validation

_BOUNDS = {"min": (">=", operator.ge), "max": ("<=", operator.le), "gt": (">", operator.gt), "lt": ("<", operator.lt)}


def _limit_problems(node, key: str = "") -> List[str]:
    """Every `setting` constraint broken anywhere in the tree."""
    if isinstance(node, dict):
        return [p for name, sub in node.items() for p in _limit_problems(sub, _join(key, name))]
    if not dataclasses.is_dataclass(node):
        return []
    problems = []
    for spec in dataclasses.fields(node):
        value, limits, name = getattr(node, spec.name), spec.metadata, _join(key, spec.name)
        problems += _limit_problems(value, name)
        if value is None or not limits:
            continue
        if "choices" in limits and value not in limits["choices"]:
            options = ", ".join(str(option) for option in limits["choices"])
            problems.append(f"{name}={value!r} is not allowed: use one of {options}")
        for bound, (symbol, holds) in _BOUNDS.items():
            if bound in limits and not holds(value, limits[bound]):
                problems.append(f"{name}={value!r} must be {symbol} {limits[bound]}")
    return problems


def _weight_problems(key: str, weight: LossWeight) -> List[str]:
    values = weight.items() if isinstance(weight, dict) else [(None, weight)]
    return [f"{_join(key, name) if name else key}={value} must be >= 0" for name, value in values if value < 0]


def _device_problems(cfg: TrainConfig, device) -> List[str]:
    device_type = str(device).split(":")[0]  # "cuda:1" or torch.device("cuda", 1) -> "cuda"
    problems = []
    if {cfg.model.dtype, cfg.precision.mixed} == {"fp16", "bf16"}:  # autocast would recast every frozen weight
        problems.append(f"model.dtype={cfg.model.dtype} with precision.mixed={cfg.precision.mixed}: autocast would "
                        "cast each frozen weight to the other half type at every use (bf16 loses fp16's precision, "
                        "fp16 bf16's range): use one half type for both, or precision.mixed=fp32")
    if device_type == "cpu":
        for key, dtype in (("model.dtype", cfg.model.dtype), ("precision.mixed", cfg.precision.mixed)):
            if dtype == "fp16":
                problems.append(f"{key}=fp16 needs a CUDA device; this run is on cpu: use {key}=bf16 or fp32")
    if cfg.model.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            problems.append("model.attention=xformers but xformers is not installed: "
                            "pip install xformers, or use model.attention=sdpa")
        if device_type != "cuda":
            problems.append(f"model.attention=xformers needs CUDA (device is {device_type}): "
                            "use model.attention=sdpa")
    return problems


# (setting in force, module, what to install): optional packages a setting needs, checked before any model loads
def _needed_packages(cfg: TrainConfig) -> List[Tuple[str, str, str]]:
    needed = []
    if cfg.deepspeed.config:
        needed.append((f"deepspeed.config={cfg.deepspeed.config}", "deepspeed", "pip install 'fastfair[train]'"))
    if cfg.optim.name == "adamw8bit":
        needed.append(("optim.name=adamw8bit", "bitsandbytes", "pip install bitsandbytes, or use optim.name=adamw"))
    if not cfg.semantics.factory and cfg.semantics.clip_backend == "open_clip":
        needed.append(("semantics.clip_backend=open_clip", "open_clip",
                       "pip install 'fastfair[clip]', or semantics.clip_backend=transformers with a transformers "
                       "CLIP folder as semantics.clip_path"))
    if cfg.faces.detector != "callable":
        detectors = detector_names(cfg.faces.detector)
        for name, modules, install in (
                ("opencv", ("cv2",), "pip install 'opencv-python-headless>=4.8,<5' (or fastfair[faces])"),
                ("mtcnn", ("facenet_pytorch",), "pip install --no-deps facenet-pytorch (it pins an old torch)"),
                ("insightface", ("insightface", "onnxruntime"), "pip install insightface onnxruntime")):
            if name in detectors:
                needed += [(f"faces.detector={cfg.faces.detector}", module, install) for module in modules]
    return needed


def check_packages(cfg: TrainConfig) -> None:
    """Check that the optional packages the settings need are installed (found, not imported: before any model
    loads, not where the first use would fail); raise ConfigError naming each setting and what to install."""
    problems = [f"{setting} needs the {module} package, which is not installed: {install}"
                for setting, module, install in _needed_packages(cfg) if importlib.util.find_spec(module) is None]
    if problems:
        raise ConfigError("missing packages:\n  " + "\n  ".join(problems))


def _sampler_problems(sampler: SamplerConfig) -> List[str]:
    problems, fewest_steps = [], sampler.num_steps
    if sampler.num_steps_range is not None:
        steps = sampler.num_steps_range
        if len(steps) != 2 or not 1 <= steps[0] <= steps[-1]:
            problems.append(f"sampler.num_steps_range={steps} must be [low, high] with 1 <= low <= high")
        else:
            fewest_steps = steps[0]
            if not steps[0] <= sampler.num_steps <= steps[-1]:  # still the count export and the demo sample with
                problems.append(f"sampler.num_steps={sampler.num_steps} lies outside sampler.num_steps_range={steps}, "
                                "which replaces it in training (each iteration draws its count from the range): "
                                "set num_steps inside the range, or sampler.num_steps_range=null for a fixed count")
    if sampler.grad_steps is not None and sampler.grad_steps > fewest_steps:
        problems.append(f"sampler.grad_steps={sampler.grad_steps} exceeds the fewest sampling steps "
                        f"({fewest_steps}): lower it or set it to null (all steps)")
    for name in ("keep_graph_steps", "keep_attention_steps"):
        if sampler.memory_budget_gb is not None and getattr(sampler, name):
            problems.append(f"sampler.memory_budget_gb and sampler.{name} are both set: the budget picks "
                            f"{name}, so set one of them ({name}=0 or memory_budget_gb=null)")
    return problems


def _data_problems(data: DataConfig) -> List[str]:
    problems = []
    if not any(spec.weight > 0 for spec in data.sets.values()):
        problems.append("data.sets: no prompt set with weight > 0: add one, e.g. data.sets.occupations.weight=1")
    for name, spec in data.sets.items():
        unknown = spec.file is None and spec.factory is None and name not in list_prompt_sets()
        if spec.weight == 0:  # left out (build_prompt_mixture reads none of it), but a misspelt name left none out
            if unknown:
                problems.append(f"data.sets.{name}.weight=0 leaves out a set the config does not have (shipped: "
                                f"{', '.join(list_prompt_sets())}; the config's: "
                                f"{', '.join(n for n in data.sets if n != name)}): check the name")
            continue
        if spec.file is not None and spec.factory is not None:  # the factory's prompts would be read, the file not
            problems.append(f"data.sets.{name} sets both file={spec.file} and factory={spec.factory}: give one of "
                            f"file / factory (data.sets.{name}.file=null or data.sets.{name}.factory=null)")
        if spec.template is not None and spec.factory is not None:  # a factory returns whole prompts
            problems.append(f"data.sets.{name} sets both template={spec.template!r} and factory={spec.factory}: a "
                            "factory's prompts are used as it returns them; put the template in the factory "
                            f"(data.sets.{name}.template=null)")
        if unknown:
            problems.append(f"data.sets.{name}: no shipped prompt set '{name}' (shipped: "
                            f"{', '.join(list_prompt_sets())}); set data.sets.{name}.file to a text file "
                            f"or data.sets.{name}.factory to 'package.module:function'")
        if spec.template is not None:
            try:
                template_field(spec.template)
            except ValueError as error:
                problems.append(f"data.sets.{name}.template: {error}")
    return problems


def _finetune_problems(cfg: TrainConfig) -> List[str]:
    target, lora = cfg.finetune.target, cfg.finetune.lora
    problems = []
    if target in ("text_lora", "text_unet_lora") and not lora.text_modules:
        problems.append(f"finetune.lora.text_modules is empty but finetune.target={target}: name the layers")
    if target in ("unet_lora", "text_unet_lora") and not lora.unet_modules:
        problems.append(f"finetune.lora.unet_modules is empty but finetune.target={target}: name the layers")
    if lora.dropout:
        problems.append(f"finetune.lora.dropout={lora.dropout}: fastfair runs the models in eval mode, and the "
                        "backward's recompute must repeat each U-Net call exactly (no random dropout): set it to 0")
    return problems


def _classifier_problems(classifiers: Dict[str, ClassifierConfig]) -> List[str]:
    problems = [] if classifiers else ["classifiers is empty: name the classifier(s) of the alignment loss"]
    claimed = {}
    for name, spec in classifiers.items():
        for attribute in spec.attributes:  # the trainer would read each attribute from one of them only
            if attribute in claimed:
                problems.append(f"classifiers.{claimed[attribute]} and classifiers.{name} both predict '{attribute}':"
                                " keep it in the attributes of one of them")
            claimed.setdefault(attribute, name)
        indices = [index for group in spec.attributes.values() for index in group]
        if not all(spec.attributes.values()):
            problems.append(f"classifiers.{name}.attributes: give each attribute its output indices, "
                            "e.g. {gender: [0, 1], race: [2, 3, 4, 5]}")
        if len(set(indices)) != len(indices) or any(index < 0 for index in indices):
            problems.append(f"classifiers.{name}.attributes: output indices must be distinct and >= 0, "
                            f"got {spec.attributes}")
        # a factory builds its own network and may read architecture its own way
        if spec.architecture is not None and not spec.factory and spec.architecture not in CLASSIFIER_ARCHITECTURES:
            problems.append(f"classifiers.{name}.architecture={spec.architecture!r} is not a fastfair classifier "
                            f"architecture: use one of {', '.join(CLASSIFIER_ARCHITECTURES)} (null: the one a "
                            "fastfair classifier file records)")
    return problems


def _target_problems(cfg: TrainConfig) -> List[str]:
    """targets parse (fastfair.targets), and agree with the classifiers and the per-attribute loss weights."""
    from fastfair.targets import load_targets  # imports torch: only when validating

    if not cfg.targets:
        return ["targets is empty: declare the attributes and their target distribution (fastfair.targets)"]
    try:
        attributes = {attribute.name: attribute for attribute in load_targets(cfg.targets).attributes}
    except (TypeError, ValueError) as error:
        return [str(error)]
    problems = []
    for level in (1, 2, 3):
        key, weight = f"loss.lambda_img_{level}", getattr(cfg.loss, f"lambda_img_{level}")
        unknown = sorted(set(weight) - set(attributes)) if isinstance(weight, dict) else []
        if unknown:
            problems.append(f"{key} names {unknown}, not targets attributes: use {', '.join(attributes)}")
        missing = [name for name in attributes if name not in weight] if isinstance(weight, dict) else []
        if missing:
            problems.append(f"{key} gives no weight for targets attribute(s) {missing}: give one per attribute "
                            "or a single number")
    if not cfg.classifiers or any(not spec.attributes for spec in cfg.classifiers.values()):
        return problems  # with a self-describing classifier file, its head is known only once loaded
    declared = {name: (f"classifiers.{clf}.attributes.{name}", indices)
                for clf, spec in cfg.classifiers.items() for name, indices in spec.attributes.items()}
    for name, attribute in attributes.items():
        if name not in declared:
            problems.append(f"targets attribute '{name}' is predicted by no classifier: add it to "
                            "classifiers.<name>.attributes")
        elif sorted(declared[name][1]) != sorted(attribute.indices):
            key, indices = declared[name]
            problems.append(f"targets attribute '{name}' reads classifier outputs {sorted(attribute.indices)} "
                            f"but {key} is {indices}: make them agree")
    return problems


def _hooks(cfg: TrainConfig) -> List[Tuple[str, str]]:
    """(key, 'package.module:function') of every hook the settings name (None where unset)."""
    hooks = [("faces.detector_fn", cfg.faces.detector_fn), ("faces.embedding_fn", cfg.faces.embedding_fn),
             ("semantics.factory", cfg.semantics.factory)]
    hooks += [(f"classifiers.{name}.factory", spec.factory) for name, spec in cfg.classifiers.items()]
    hooks += [(f"data.sets.{name}.factory", spec.factory) for name, spec in cfg.data.sets.items()]
    return hooks


def _hook_problems(cfg: TrainConfig) -> List[str]:
    """Every 'package.module:function' value must have that form (``check_hooks`` imports them)."""
    return [f"{key}={value!r}: expected 'package.module:function'" for key, value in _hooks(cfg)
            if value is not None and (value.count(":") != 1 or not all(value.split(":")) or value.startswith("."))]


def check_hooks(cfg: TrainConfig) -> None:
    """Import every hook the settings name (``fastfair.hooks.load_callable``), before any model loads: a misspelt
    one was found only once Stable Diffusion and the judges had loaded. ConfigError naming each."""
    from fastfair.hooks import load_callable

    problems = []
    # what the run does not call, as build_judges reads the settings: a set left out, the face embedding without
    # the face loss, a detector function under another faces.detector
    left_out = {f"data.sets.{name}.factory" for name, spec in cfg.data.sets.items() if spec.weight == 0}
    if not (cfg.loss.face_loss and cfg.loss.lambda_face > 0):
        left_out.add("faces.embedding_fn")
    if cfg.faces.detector != "callable":
        left_out.add("faces.detector_fn")
    for key, value in _hooks(cfg):
        if value is None or key in left_out:
            continue
        try:
            load_callable(value, key)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("hooks that cannot be imported:\n  " + "\n  ".join(problems))


_ENVIRONMENT_VARIABLE = re.compile(r"\$(\w|\{)")
_NOT_EXPANDED = ("fastfair does not expand environment variables in paths (only ~): write the path itself, or "
                 "give it on the command line, where the shell expands them")


def validate(cfg: TrainConfig, world_size: int = 1, device="cpu") -> None:
    """Check cfg for a run on world_size ranks of device type `device`; raise ConfigError listing every problem.

    Local files are not looked at: see `check_files`.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    problems = _limit_problems(cfg)
    if not cfg.output_dir:
        problems.append("output_dir is empty: set output_dir=DIR (checkpoints and the resolved config go there)")
    for key, path in (("output_dir", cfg.output_dir), ("logging.tensorboard_dir", cfg.logging.tensorboard_dir)):
        # a folder named $HOME would be made (one that exists, an earlier run's, is resumed as it is)
        if path and _ENVIRONMENT_VARIABLE.search(path) and not Path(path).exists():
            problems.append(f"{key}={path}: {_NOT_EXPANDED}")
    # a divisor of checkpoint_every keeps every checkpoint written; others name iterations never saved
    if cfg.checkpoint_every > 0 and cfg.keep_every % cfg.checkpoint_every and cfg.checkpoint_every % cfg.keep_every:
        problems.append(f"keep_every={cfg.keep_every} is not a multiple of checkpoint_every="
                        f"{cfg.checkpoint_every}: some of those checkpoints would never be written (a divisor of it "
                        "keeps all)")
    if cfg.batch.images_per_prompt % world_size:
        problems.append(f"batch.images_per_prompt={cfg.batch.images_per_prompt} is not divisible by the "
                        f"world size {world_size}: use a multiple of {world_size} or change the rank count")
    if len(cfg.optim.betas) != 2 or not all(0 <= beta < 1 for beta in cfg.optim.betas):
        problems.append(f"optim.betas={cfg.optim.betas} must be two numbers in [0, 1)")
    if cfg.deepspeed.zero_stage is not None and not cfg.deepspeed.config:
        problems.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} without deepspeed.config: the stage applies "
                        "to a DeepSpeed JSON (e.g. deepspeed.config=configs/ds/zero2_bf16.json); without one the run "
                        "uses no ZeRO")
    if cfg.deepspeed.zero_stage == 3:
        problems.append("deepspeed.zero_stage=3 partitions the parameters, which fastfair's direct U-Net calls "
                        "cannot gather: use 1 or 2")
    detectors = detector_names(cfg.faces.detector)
    if not detectors or any(name not in FACE_DETECTORS for name in detectors) or (
            len(detectors) > 1 and "callable" in detectors):
        problems.append(f"faces.detector={cfg.faces.detector!r}: expected one of {', '.join(FACE_DETECTORS)}, or a "
                        "comma-separated list of opencv, insightface, mtcnn, none tried in order per image (e.g. "
                        "insightface,mtcnn)")
    if cfg.faces.detector == "callable" and not cfg.faces.detector_fn:
        problems.append("faces.detector=callable needs faces.detector_fn='package.module:function'")
    if cfg.faces.detector_fn and cfg.faces.detector != "callable":
        problems.append(f"faces.detector_fn={cfg.faces.detector_fn} is read only with faces.detector=callable, but "
                        f"faces.detector={cfg.faces.detector}: set faces.detector=callable or faces.detector_fn=null")
    if cfg.faces.detector_path and "insightface" not in detectors:
        problems.append(f"faces.detector_path={cfg.faces.detector_path} is insightface's model folder, but "
                        f"faces.detector={cfg.faces.detector}: set faces.detector=insightface or "
                        "faces.detector_path=null")
    problems += _hook_problems(cfg)
    sem = cfg.semantics
    if not sem.factory and sem.clip_backend == "open_clip" and (not sem.clip_model.strip() or ":" in sem.clip_model):
        problems.append(f"semantics.clip_model={sem.clip_model!r}: name a built-in open_clip architecture, e.g. "
                        "ViT-H-14 (the one semantics.clip_path's checkpoint was trained as)")
    for key in cfg.resume_allow:
        try:
            _field_type(key.split("."))
        except ConfigError as error:
            problems.append(f"resume_allow: {error}")
    if cfg.loss.judge_images is not None and not cfg.loss.recompute_judges:
        problems.append(f"loss.judge_images={cfg.loss.judge_images} slices the decoder's and judges' recompute, "
                        "but loss.recompute_judges=false keeps every slice's activations for the backward: set "
                        "loss.recompute_judges=true or loss.judge_images=null")
    for level in (1, 2, 3):
        problems += _weight_problems(f"loss.lambda_img_{level}", getattr(cfg.loss, f"lambda_img_{level}"))
    problems += _sampler_problems(cfg.sampler) + _data_problems(cfg.data) + _finetune_problems(cfg)
    problems += _classifier_problems(cfg.classifiers) + _target_problems(cfg) + _device_problems(cfg, device)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- local files

def single_file_config_problems(config: Optional[str], pretrained: str, key: str = "model.config",
                                pretrained_key: str = "model.pretrained") -> List[str]:
    """What is wrong with the architecture folder of the single-file checkpoint pretrained ([] if nothing);
    key/pretrained_key name the settings in the messages (config keys or command-line flags)."""
    if not config:
        return [f"{pretrained_key}={pretrained} is a single-file checkpoint, which holds weights only: set {key} "
                f"to {SINGLE_FILE_CONFIG_LAYOUT}"]
    where = Path(config)
    if not where.is_dir():
        return [f"{key}={config} {'is not a folder' if where.exists() else 'does not exist'}: expected "
                f"{SINGLE_FILE_CONFIG_LAYOUT}"]
    missing = [f"{name}/" for name in DIFFUSERS_SUBFOLDERS if not (where / name).is_dir()]
    missing += [] if (where / "model_index.json").is_file() else ["model_index.json"]
    return [f"{key}={config} lacks {', '.join(missing)}: expected {SINGLE_FILE_CONFIG_LAYOUT}"] if missing else []


def _model_path_problems(model: ModelConfig) -> List[str]:
    pretrained = model.pretrained
    where = Path(pretrained)
    if not pretrained:
        return [f"model.pretrained is empty: point it at {EXPECTED_MODEL_LAYOUT}"]
    if where.is_dir():
        missing = [name for name in DIFFUSERS_SUBFOLDERS if not (where / name).is_dir()]
        if missing:
            return [f"model.pretrained={pretrained} lacks {', '.join(m + '/' for m in missing)}: "
                    f"expected {EXPECTED_MODEL_LAYOUT}"]
        if model.config:  # it would go unread (older fastfair ignored it): the folder's own configs build the model
            return [f"model.config={model.config} is read only with a single-file model.pretrained, but "
                    f"{pretrained} is a diffusers folder with its own configs: set model.config=null (resuming a "
                    "run saved with it: also resume_allow=[model.config])"]
        return []
    if where.is_file() and where.suffix in CHECKPOINT_SUFFIXES:
        return single_file_config_problems(model.config, pretrained)
    state = "is not a checkpoint file" if where.exists() else "does not exist"
    state += f" ({_NOT_EXPANDED})" if _ENVIRONMENT_VARIABLE.search(pretrained) else ""
    return [f"model.pretrained={pretrained} {state}: expected {EXPECTED_MODEL_LAYOUT}"]


def _deepspeed_problems(cfg: TrainConfig) -> List[str]:
    try:
        ds = json.loads(Path(cfg.deepspeed.config).read_text())
    except (OSError, ValueError) as error:
        return [f"deepspeed.config={cfg.deepspeed.config} cannot be read as JSON ({error})"]
    if not isinstance(ds, dict):
        return [f"deepspeed.config={cfg.deepspeed.config} holds a JSON {type(ds).__name__}: expected an object "
                "({\"zero_optimization\": {\"stage\": 2}, ...}, as configs/ds/*.json)"]
    for key in ("zero_optimization", "fp16", "bf16", "bfloat16"):
        if key in ds and not isinstance(ds[key], dict):
            legacy = " (DeepSpeed's older true/false form: write {\"stage\": 1} or {\"stage\": 0})" if (
                key == "zero_optimization" and isinstance(ds[key], bool)) else ""
            return [f"deepspeed.config={cfg.deepspeed.config}: {key} is {json.dumps(ds[key])}, expected an object"
                    f"{legacy}"]
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, str) and stage.strip() in ("0", "1", "2", "3"):  # as DeepSpeed reads it: "3" is 3
        stage = int(stage)
    if cfg.deepspeed.zero_stage is None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        return [f"deepspeed.config={cfg.deepspeed.config}: zero_optimization.stage is {json.dumps(stage)}, expected "
                "the number 0, 1 or 2"]
    if cfg.deepspeed.zero_stage is None and stage == 3:
        return [f"deepspeed.config={cfg.deepspeed.config} sets ZeRO stage 3, which partitions the parameters that "
                "fastfair's direct U-Net calls cannot gather: use a stage 1 or 2 JSON or deepspeed.zero_stage=2"]
    unread = [key for key in ("optimizer", "scheduler") if key in ds]  # fastfair passes DeepSpeed its own
    if unread:
        return [f"deepspeed.config={cfg.deepspeed.config} has {' and '.join(unread)} section(s), which fastfair does "
                "not use (its optimizer and learning-rate schedule come from optim.*): delete them and set optim.*"]
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {})
    if isinstance(offload, dict) and offload.get("device", "none") != "none":
        return [f"deepspeed.config={cfg.deepspeed.config} offloads the optimizer (zero_optimization."
                "offload_optimizer), which needs DeepSpeed's own CPU Adam, not the torch optimizer fastfair passes: "
                "remove it"]
    # DeepSpeed reads "bfloat16" as "bf16" (its older name)
    sections = {"fp16": ds.get("fp16", {}), "bf16": ds.get("bf16", ds.get("bfloat16", {}))}
    # Where DeepSpeed's optimizer checks the gradients itself, fastfair leaves the non-finite-step skip to it:
    # these switches turn that check off, and a NaN gradient would be applied to the weights and the EMA (fp16
    # and bf16 check for overflow whatever compute_grad_norm says; in fp32 it is the only check).
    half = any(section.get("enabled", False) for section in sections.values())
    unchecked = [name for name, off in (
        ("zero_optimization.compute_grad_norm",
         not half and ds.get("zero_optimization", {}).get("compute_grad_norm") is False),
        ("bf16.check_grad_overflow", sections["bf16"].get("check_grad_overflow") is False)) if off]
    if unchecked:
        return [f"deepspeed.config={cfg.deepspeed.config} sets {' and '.join(unchecked)} false, which turns off "
                "DeepSpeed's check for non-finite gradients (a NaN step would be applied, not skipped): remove it"]
    enabled = [name for name, section in sections.items() if section.get("enabled", False)]
    wanted = [] if cfg.precision.mixed == "fp32" else [cfg.precision.mixed]
    if cfg.model.dtype == "fp16" and "fp16" not in enabled and enabled == wanted:
        # the gradient flows back through the frozen fp16 weights' activations: without fp16 loss scaling (which
        # DeepSpeed does only with its fp16 section; precision.loss_scale is not used under DeepSpeed) small
        # gradients underflow to zero there
        return [f"model.dtype=fp16 with deepspeed.config={cfg.deepspeed.config}, which enables no fp16 (so no loss "
                "scaling, and precision.loss_scale is not used under DeepSpeed): the gradient through the fp16 "
                "frozen weights would underflow; use precision.mixed=fp16 with configs/ds/zero2_fp16.json, or "
                "model.dtype=bf16 or fp32"]
    if enabled != wanted:
        # configs/ds ships fp16 and bf16 JSONs only: an fp32 run needs one with neither section enabled
        fix = ("use a JSON whose fp16 and bf16 sections are absent or disabled" if not wanted else
               f"pick the JSON that matches (configs/ds/*_{cfg.precision.mixed}.json)")
        return [f"deepspeed.config={cfg.deepspeed.config} enables {enabled or 'neither fp16 nor bf16'} but "
                f"precision.mixed={cfg.precision.mixed}: {fix} or change precision.mixed"]
    return []


def check_files(cfg: TrainConfig) -> None:
    """Check that every local path the run reads exists with the expected layout; raise ConfigError."""
    problems = _model_path_problems(cfg.model)
    # (key, path, what it must be: "file", "folder", or None for either)
    # a factory may build its classifier without a file, or read a folder of its own format
    needed = [(f"classifiers.{name}.path", spec.path, None if spec.factory else "file")
              for name, spec in cfg.classifiers.items() if spec.path or not spec.factory]
    if not cfg.semantics.factory:  # a factory builds its encoders without these files
        open_clip = cfg.semantics.clip_backend == "open_clip"  # a checkpoint file; transformers: a folder
        needed += [("semantics.clip_path", cfg.semantics.clip_path, "file" if open_clip else "folder"),
                   ("semantics.dino_path", cfg.semantics.dino_path, "folder")]
    needed += [(f"data.sets.{name}.file", spec.file, "file") for name, spec in cfg.data.sets.items()
               if spec.file and spec.weight > 0]  # weight 0 leaves a set out: its file is not read
    if cfg.loss.face_loss and cfg.loss.lambda_face > 0:
        needed.append(("faces.bank", cfg.faces.bank, "file"))
        if not cfg.faces.embedding_fn:
            needed.append(("faces.embedding", cfg.faces.embedding, "file"))
    if "insightface" in detector_names(cfg.faces.detector):
        needed.append(("faces.detector_path", cfg.faces.detector_path, "folder"))
    if cfg.resume not in ("auto", ""):
        needed.append(("resume", cfg.resume, None))
    for key, path, kind in needed:
        if not path:
            problems.append(f"{key} is empty: set it to a local {kind or 'file or folder'}")
        elif not Path(path).exists():
            hint = ("; resume=auto continues from output_dir's newest checkpoint, resume= (nothing after '=') starts "
                    "afresh" if key == "resume" else "")
            hint += f" ({_NOT_EXPANDED})" if _ENVIRONMENT_VARIABLE.search(str(path)) else ""
            problems.append(f"{key}={path} does not exist{hint}")
        elif kind == "file" and Path(path).is_dir():
            problems.append(f"{key}={path} is a folder: give the file itself")
        elif kind == "folder" and not Path(path).is_dir():
            problems.append(f"{key}={path} is a file: give the folder that holds the model")
    if cfg.deepspeed.config:
        problems += _deepspeed_problems(cfg)
    if problems:
        raise ConfigError("missing or malformed files:\n  " + "\n  ".join(problems))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON named by cfg.deepspeed.config (none: an empty one) with the run's own values set."""
    ds = json.loads(Path(cfg.deepspeed.config).read_text()) if cfg.deepspeed.config else {}
    ds.update(train_micro_batch_size_per_gpu=cfg.batch.per_rank(world_size), gradient_accumulation_steps=1,
              train_batch_size=cfg.batch.images_per_prompt, gradient_clipping=cfg.optim.grad_clip or 0.0)
    if cfg.deepspeed.zero_stage is not None:
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.deepspeed.zero_stage}
    return ds
