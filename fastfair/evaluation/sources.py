"""The models an evaluation samples from: the base model and, optionally, a finetuned one.

Both are an `ImageSource`: a U-Net plus ``embeddings(prompt) -> (cond [1, L, D], uncond [1, L, D])``; the
VAE, scheduler and noise are shared, so the same noise gives paired images (`fastfair.evaluation.cache`).

- base: a local diffusers folder / single-file checkpoint, a ``pkg://package/path`` shipped in a package, or a
  registered name (``toy``), see `resolve_model`;
- finetuned: a training checkpoint folder (``<output_dir>/checkpoints/step_*``, with the settings it was trained
  with: ``fastfair.checkpoint.config_file``) or a folder written by ``python -m fastfair.export`` (LoRA, prefix
  tokens or a full U-Net).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from fastfair.evaluation.cache import weight_fingerprint
from fastfair.evaluation.shared import SharedLoads
from fastfair.hooks import resolve_package_path
from fastfair.models import load_stable_diffusion


def _toy_pipeline() -> str:
    try:
        from fastfair.toy.files import PIPELINE, weights_path
    except ImportError as error:
        raise ValueError(f"--model toy: the toy world is not part of this install ({error})") from None
    try:
        return weights_path(PIPELINE)
    except FileNotFoundError as error:
        raise ValueError(f"--model toy: the toy weights are not installed: {error}") from None


# name -> function returning the local diffusers folder of that model (raises ValueError when absent)
MODEL_REGISTRY: Dict[str, Callable[[], str]] = {"toy": _toy_pipeline}


def resolve_model(model: str) -> str:
    """A registered model name (``toy``) -> its local folder; ``pkg://package/path`` -> that path inside the
    installed package (as configs resolve it); anything else is taken as a local path."""
    if model in MODEL_REGISTRY:
        return str(MODEL_REGISTRY[model]())
    # ~ as configs read paths: after --model= the shell leaves it unexpanded
    path = resolve_package_path(os.path.expanduser(str(model)), "--model")
    if not Path(path).exists():
        raise ValueError(f"--model {model}: no such file or folder, and not a registered name "
                         f"({', '.join(MODEL_REGISTRY)})")
    return path


def resolve_model_config(model_config: Optional[str]) -> Optional[str]:
    """--model-config as configs read model.config: ``pkg://package/path`` -> that folder in the installed package."""
    return resolve_package_path(os.path.expanduser(str(model_config)), "--model-config") if model_config else None


EXPECTED_EXPORT = "an export folder (python -m fastfair.export CKPT --out DIR)"
EXPECTED_CHECKPOINT = ("a training checkpoint folder (RUN/checkpoints/step_N, with weights.safetensors and "
                       "ema.safetensors)")


def finetuned_kind(folder, flag: str = "--finetuned", checkpoints: bool = True) -> str:
    """'checkpoint' or 'export': what the folder passed as `flag` holds; a ValueError naming `flag` and the
    folder it expects otherwise (checkpoints: whether `flag` takes training checkpoints as well as exports)."""
    from fastfair.checkpoint import has_weights, list_checkpoints
    from fastfair.export import LORA_FILE, PREFIX_FILE, export_contents  # the files fastfair.export writes

    folder = Path(folder)
    if has_weights(folder):  # its weights are all that is read: state.pt may have been deleted to save space
        if checkpoints:
            return "checkpoint"
        raise ValueError(f"{flag} {folder}: a training checkpoint; export it first (python -m fastfair.export "
                         f"{folder} --out DIR) and pass {flag} DIR")
    if export_contents(folder, flag):
        return "export"
    expected = f"{EXPECTED_EXPORT} or {EXPECTED_CHECKPOINT}" if checkpoints else EXPECTED_EXPORT
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():  # a training run's output folder
        found = list_checkpoints(folder, resumable=False)
        if not found:
            fix = "it has no checkpoint yet"
        elif checkpoints:
            fix = f"pass one of its checkpoints, e.g. {flag} {found[max(found)]}"
        else:
            fix = f"export one of its checkpoints first: python -m fastfair.export {found[max(found)]} --out DIR"
        raise ValueError(f"{flag} {folder}: a training run's folder, not {expected}; {fix}")
    looked_for = f"{LORA_FILE}, {PREFIX_FILE}" + (", unet/ or ema.safetensors" if checkpoints else " or unet/")
    if folder.is_file():
        raise ValueError(f"{flag} {folder}: a file; pass the folder that holds it ({flag} {folder.parent})")
    what = f"no {looked_for} in it" if folder.is_dir() else "no such folder"
    raise ValueError(f"{flag} {folder}: {what}; expected {expected}")


def check_finetuned_base(model: str, finetuned, flag: str = "--finetuned") -> None:
    """Before any load, `finetuned` (a training checkpoint or an export) against the base model it is put on:
    a ValueError when --model is a model written by ``python -m fastfair.export --merged`` from the very
    checkpoint `finetuned` is (or was exported from), as its weights would apply twice; a warning when its run
    trained on another base model (the checkpoint's model.pretrained, or the one its export records), which may
    be deliberate (a sibling fine-tune of the same architecture) but is more often a slip."""
    import os
    import warnings

    from fastfair.checkpoint import config_file
    from fastfair.config import load_config
    from fastfair.export import EXPORT_INFO, export_info

    path, folder = resolve_model(model), Path(finetuned)
    merged = export_info(path) if Path(path).is_dir() else {}
    if (folder / EXPORT_INFO).is_file():
        recorded = export_info(folder)
        source, trained_on, where = recorded.get("checkpoint"), recorded.get("model"), folder / EXPORT_INFO
    else:  # a training checkpoint
        source, where = str(folder), config_file(folder)
        try:
            trained_on = load_config(where).model.pretrained
        except (OSError, ValueError):  # refused with its reason when the weights are read
            trained_on = None
    if merged.get("merged") and source and merged.get("checkpoint") \
            and os.path.realpath(source) == os.path.realpath(merged["checkpoint"]):
        base = f"--model {merged['model']} {flag} {finetuned}" if merged.get("model") else f"its base model with {flag}"
        raise ValueError(f"{flag} {finetuned}: --model {model} was written by python -m fastfair.export --merged from "
                         f"the same checkpoint ({merged['checkpoint']}): its weights are fused in already and would "
                         f"apply twice; pass --model {model} alone, or {base}")
    try:
        same = trained_on is None or os.path.realpath(resolve_model(str(trained_on))) == os.path.realpath(path)
    except (OSError, ValueError):  # its base moved or gone: nothing to compare with
        same = True
    if not same:
        warnings.warn(f"{flag}: the run trained on model.pretrained={trained_on} ({where}), not on --model {model}: "
                      f"its weights are put on another base model than their own; pass --model {trained_on} unless "
                      "you mean to", stacklevel=3)


@dataclass
class ImageSource:
    """A U-Net and its text embeddings; ``embeddings(prompt)`` -> (cond, uncond), each [1, L, D]."""

    unet: torch.nn.Module
    embeddings: Callable[[str], Tuple[torch.Tensor, torch.Tensor]]


def _pipeline_source(pipe, prefix: str = "") -> ImageSource:
    """Embeddings the way diffusers' pipeline computes them (LoRA scale, textual-inversion tokens)."""
    def embeddings(prompt):
        cond, uncond = pipe.encode_prompt(prefix + prompt, pipe.text_encoder.device, 1, True, "")
        return cond, uncond
    return ImageSource(pipe.unet, embeddings)


def _copy_parts(base, changed: Iterable[str]):
    """The base model's parts with those named in ``changed`` (StableDiffusionParts fields) deep-copied, to be
    changed, and the others shared with the base: what a second load would give, without reading the files again
    and without holding a second copy of what the finetuned model leaves as it is (SD 1.5: 3.4 GB of fp32 U-Net
    for a text-encoder run). The scheduler is always copied: it is small, and sampling sets its timesteps."""
    return dataclasses.replace(base, scheduler=copy.deepcopy(base.scheduler),
                               **{name: copy.deepcopy(getattr(base, name)) for name in set(changed)})


def _export_changes(folder: Path, kind: str) -> Tuple[str, ...]:
    """The parts `fastfair.export.load_into_pipeline` changes in place for this export: a prefix adds a token to the
    tokenizer and the text encoder; a U-Net folder replaces the pipeline's U-Net (nothing changed); LoRA the
    parts its file's keys name (both when a key names neither, as diffusers may read other layouts)."""
    from fastfair.export import LORA_FILE, PREFIX_FILE

    if kind == PREFIX_FILE:
        return ("tokenizer", "text_encoder")
    if kind != LORA_FILE:
        return ()
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / LORA_FILE), "pt") as lora:
            heads = {key.split(".", 1)[0] for key in lora.keys()}
    except SafetensorError as error:  # e.g. a file cut short by a full disk
        raise ValueError(f"--finetuned {folder}: its {LORA_FILE} is not a readable safetensors file ({error}); "
                         "export the checkpoint again (python -m fastfair.export CKPT --out DIR)") from None
    return tuple(sorted(heads)) if heads <= {"unet", "text_encoder"} else ("text_encoder", "unet")


def _checkpoint_source(base, folder: Path, weights: str) -> Tuple[object, ImageSource]:
    """(the finetuned model's parts, its ImageSource) for a training checkpoint on the base model's parts."""
    from fastfair.checkpoint import config_file, for_model, load_weights
    from fastfair.config import load_config
    from fastfair.finetune import CHANGED_PARTS, FinetunedModel

    config_path = config_file(folder)
    if not config_path.is_file():
        raise ValueError(f"--finetuned {folder}: a training checkpoint needs its run config at {config_path}")
    cfg = load_config(config_path)
    parts = _copy_parts(base, CHANGED_PARTS[cfg.finetune.target])
    dtype = parts.unet.dtype
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora, training=False)
    raw, ema = load_weights(folder)  # not state.pt: a DeepSpeed run's holds DeepSpeed objects
    tensors = for_model(ema if weights == "ema" else raw, model.trainable,
                        f"--finetuned {folder} (finetune.target={cfg.finetune.target} in {config_path})")
    with torch.no_grad():
        for name, param in model.trainable.items():
            # in the base's dtype, as diffusers casts an export's adapters: a checkpoint and its export then
            # sample alike
            param.data = tensors[name].to(param.device, dtype)
    if cfg.finetune.target == "unet_full":
        model.unet.requires_grad_(False)

    def embeddings(prompt):
        with torch.no_grad():
            return model.encode([prompt]), model.encode([""], positive=False)
    return parts, ImageSource(model.unet, embeddings)


_KEYS = dict(key="--model", config_key="--model-config")  # how errors name the settings


def load_sources(model: str, finetuned: Optional[str] = None, dtype: str = "fp32", device="cpu",
                 weights: str = "ema", model_config: Optional[str] = None, shared: Optional[SharedLoads] = None):
    """(vae, scheduler, {"base": ImageSource, "finetuned": ImageSource}) ready to sample, frozen.
    model_config: the architecture folder when model is a single-file checkpoint (fastfair.models). The base model
    is read from disk once: the finetuned one is built on copies of the parts it changes and shares the others
    (`_copy_parts`). shared: where a sweep holds the base model between evaluations
    (`fastfair.evaluation.shared`), keyed by its files, dtype and device; the finetuned model's weights never
    reach it."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"--weights {weights!r}: expected 'ema' or 'raw'")
    kind = finetuned_kind(finetuned) if finetuned else None  # before the slow loads
    model_config = resolve_model_config(model_config)
    if kind == "export" and weights == "raw":  # its weights were picked when it was written
        raise ValueError(f"--weights raw: --finetuned {finetuned} is an export, which holds the weights "
                         "`python -m fastfair.export --weights` chose: pass the training checkpoint instead, or drop "
                         "--weights for an export written with --weights raw")
    path = resolve_model(model)
    if finetuned:
        check_finetuned_base(model, finetuned)
    # the files' fingerprints too: weights rewritten under the same path between two evaluations are read again
    settings = (path, dtype, str(device), model_config, weight_fingerprint(path), weight_fingerprint(model_config))
    base = (shared or SharedLoads()).get(
        "base model", settings, lambda: load_stable_diffusion(path, dtype, device=device, config=model_config, **_KEYS))
    from fastfair.export import export_contents, load_into_pipeline, merged_prompt_prefix

    prefix = merged_prompt_prefix(path)  # a model written by export --merged from a prefix run: its token
    sources = {"base": _pipeline_source(base.pipeline().to(device), prefix)}
    if finetuned:
        folder = Path(finetuned)
        if kind == "checkpoint":
            parts, sources["finetuned"] = _checkpoint_source(base, folder, weights)
        else:
            parts = _copy_parts(base, _export_changes(folder, export_contents(folder, "--finetuned")))
            pipe = parts.pipeline().to(device)
            sources["finetuned"] = _pipeline_source(pipe, prefix + load_into_pipeline(pipe, folder, "--finetuned"))
        parts.text_encoder.to(device)
        sources["finetuned"].unet.to(device)
    # a copy: sampling sets its timesteps, and a shared base model stays as loaded
    return base.vae, copy.deepcopy(base.scheduler), sources
