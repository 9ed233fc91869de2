"""Export a training checkpoint for diffusers: ``python -m fastfair.export CKPT --out DIR [--weights ema|raw]``.

Writes into DIR
- ``pytorch_lora_weights.safetensors`` (LoRA targets): the format ``StableDiffusionPipeline.load_lora_weights``
  reads, with the LoRA rank/alpha/modules as adapter metadata; text-encoder keys are
  ``text_encoder.text_model.<module>`` whichever transformers trained them (``checkpoint.stable_name``), the
  layout published SD LoRAs use and diffusers loads under transformers 4 and 5;
- ``prefix.safetensors`` (prefix target): the soft tokens as a textual-inversion embedding ``{"emb_params":
  [N, D]}``; ``pipe.load_textual_inversion(file, token=PREFIX_TOKEN)`` then a prompt starting with
  ``PREFIX_TOKEN`` places them right after the start token, as in training;
- ``unet/`` (full finetuning): the U-Net, ``save_pretrained`` layout;
- ``fastfair_export.json``: how the run sampled while it trained (guidance scale, steps: sampler.num_steps, inside
  the sampler.num_steps_range a run draws from), its target, base model and checkpoint; ``python -m
  fastfair.generate`` takes the guidance and steps as its defaults.
With ``--merged`` DIR is instead a whole diffusers model (``StableDiffusionPipeline.from_pretrained(DIR)``, no LoRA
loading): the base model with the finetuned weights in place (LoRA fused into the weights it adapts, a prefix as a
textual-inversion token the prompts must start with, a full U-Net as it is), its scheduler the DPM-Solver++ the run
sampled with, and ``fastfair_export.json``; ``merged_export``.
The EMA weights are exported by default (they are what is evaluated). The settings are the checkpoint's own
(``step_*/config.yaml``; for checkpoints written before they held one, ``<output_dir>/config.yaml``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from fastfair.checkpoint import config_file, has_weights, list_checkpoints, load_weights
from fastfair.cli import file_instead_of_folder
from fastfair.config import load_config
from fastfair.files import plain_mode, write_text
from fastfair.pipeline_folder import save_pipeline_folder

PREFIX_TOKEN = "<fastfair-prefix>"


def refuse_prefix_token(prompts, flag: str) -> None:
    """Refuse a prompt holding PREFIX_TOKEN: fastfair puts the token before every prompt of a prefix export
    itself, so an export read it twice (10 soft tokens) where the checkpoint read the token's text as words."""
    given = next((prompt for prompt in prompts if PREFIX_TOKEN in prompt), None)
    if given is not None:
        raise ValueError(f"{flag} {given!r}: holds {PREFIX_TOKEN}, which fastfair puts before the prompt of a prefix "
                         "model itself (a plain diffusers pipeline needs it written; fastfair's tools do not): leave "
                         "it out")
EXPORT_INFO = "fastfair_export.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
PREFIX_FILE = "prefix.safetensors"
UNET_DIR = "unet"
EXPORT_KINDS = (LORA_FILE, PREFIX_FILE, UNET_DIR)  # what an export folder holds: exactly one of them


def export_contents(folder, flag: str = "--lora"):
    """Which of EXPORT_KINDS the folder holds (None: none); a ValueError naming `flag` where it holds several,
    as when two exports of different runs went into one folder: a consumer would read one of them silently."""
    if (Path(folder) / "model_index.json").is_file():  # its unet/ would be taken for an export's, silently
        raise ValueError(f"{flag} {folder}: a whole diffusers model (model_index.json), not a fastfair export; pass "
                         "it as --model, or export a fastfair checkpoint (python -m fastfair.export CKPT --out DIR)")
    found = [name for name in EXPORT_KINDS if (Path(folder) / name).exists()]
    if len(found) > 1:
        raise ValueError(f"{flag} {folder}: holds {' and '.join(found)}, the exports of different runs; export each "
                         "run into its own folder")
    return found[0] if found else None


def _peft_to_diffusers(weights: dict, part: str) -> dict:
    """{'<part>.<module>.lora_A.default.weight': t} -> {'<module>.lora_A.weight': t} for one model part."""
    start = part + "."
    # '.default' ends an embedding LoRA's names (lora_embedding_A.default) and is inside the others'
    return {re.sub(r"\.default(?=\.|$)", "", name[len(start):]): t for name, t in weights.items()
            if name.startswith(start)}


def _lora_metadata(lora, modules) -> dict:
    # the empty patterns too: diffusers 0.36 reads them without a default (KeyError 'rank_pattern')
    return {"r": lora.rank, "lora_alpha": lora.alpha or lora.rank, "target_modules": list(modules),
            "rank_pattern": {}, "alpha_pattern": {}}


def _check_export_folder(out: Path, writes: str, checkpoint_dir: Path) -> None:
    """Refuses an --out where this export would replace or mix with what is there: a file, a whole model (its
    unet/ replaced), another kind of export (consumers would read one of the two), or an export of another
    checkpoint (overwritten without a word; the same checkpoint's is written again, e.g. with other --weights)."""
    problem = file_instead_of_folder("--out", out, "the export")
    if problem:
        raise ValueError(problem)
    if (out / "model_index.json").is_file():
        raise ValueError(f"--out {out}: a whole diffusers model (model_index.json); its files would be replaced: "
                         "export into an empty or new folder")
    others = [name for name in EXPORT_KINDS if name != writes and (out / name).exists()]
    if others:  # consumers would read one of the two exports, silently
        raise ValueError(f"--out {out} holds {' and '.join(others)} of another export: export into an empty or new "
                         "folder, or delete them first")
    if (out / writes).exists():
        try:
            source = json.loads((out / EXPORT_INFO).read_text()).get("checkpoint")
        except (OSError, ValueError):
            source = None
        if source != str(checkpoint_dir.resolve()):
            raise ValueError(f"--out {out} holds the export of {source or 'another checkpoint'}: export into an empty "
                             "or new folder, or delete it first")


def export(checkpoint_dir, out, weights: str = "ema") -> Path:
    """Write the checkpoint's finetuned weights in diffusers' formats (module docstring); returns out."""
    from diffusers import StableDiffusionPipeline

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: expected 'ema' or 'raw'")
    raw, ema = load_weights(checkpoint_dir)  # first: it says when the folder is not a checkpoint
    config_path = config_file(checkpoint_dir)
    if not config_path.is_file():
        raise ValueError(f"{checkpoint_dir}: no run config at {config_path} (export reads the checkpoint inside "
                         "<output_dir>/checkpoints/ with <output_dir>/config.yaml beside it)")
    cfg = load_config(config_path)
    tensors = ema if weights == "ema" else raw
    target, lora = cfg.finetune.target, cfg.finetune.lora
    writes = {"prefix": PREFIX_FILE, "unet_full": UNET_DIR}.get(target, LORA_FILE)
    _check_export_folder(out, writes, checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    if target == "prefix":
        from safetensors.torch import save_file

        (prefix,) = tensors.values()
        save_file({"emb_params": prefix.contiguous()}, str(out / PREFIX_FILE))
    elif target == "unet_full":
        from diffusers import UNet2DConditionModel

        # only the architecture is read: every weight is the checkpoint's (a single-file model's architecture is
        # model.config, a folder of configs without weights)
        pretrained = Path(cfg.model.pretrained)
        arch = pretrained if pretrained.is_dir() or not cfg.model.config else Path(cfg.model.config)
        if not (arch / UNET_DIR / "config.json").is_file():
            raise ValueError(f"{checkpoint_dir}: no U-Net config at {arch / UNET_DIR / 'config.json'} "
                             f"(model.pretrained={cfg.model.pretrained}, model.config={cfg.model.config} in "
                             f"{config_path}; a relative path, as fastfair before 2026-11-30 saved them, is read "
                             f"from the current folder, {Path.cwd()})")
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / UNET_DIR))
        unet.load_state_dict(_peft_to_diffusers(tensors, "unet"))
        unet.save_pretrained(out / UNET_DIR)
    else:
        unet_layers, text_layers = _peft_to_diffusers(tensors, "unet"), _peft_to_diffusers(tensors, "text_encoder")
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=unet_layers or None, text_encoder_lora_layers=text_layers or None,
            unet_lora_adapter_metadata=_lora_metadata(lora, lora.unet_modules) if unet_layers else None,
            text_encoder_lora_adapter_metadata=_lora_metadata(lora, lora.text_modules) if text_layers else None)
    sampler, steps = cfg.sampler, cfg.sampler.num_steps
    low, high = sampler.num_steps_range or (steps, steps)
    if not low <= steps <= high:  # a run saved before fastfair required num_steps inside its range
        steps = round((low + high) / 2)
    info = {"guidance_scale": sampler.guidance_scale,
            # a run drawing its step count per iteration: its num_steps, within the range (as the demo evaluates)
            "num_steps": steps,
            "resolution": cfg.model.resolution,  # the side it sampled at; null: the model's own
            "target": target, "model": cfg.model.pretrained, "checkpoint": str(checkpoint_dir.resolve()),
            "weights": weights}
    write_text(out / EXPORT_INFO, json.dumps(info, indent=1) + "\n")
    # safetensors (and diffusers through it) write 0600; only what this export wrote (--out may hold other files)
    written = [out / writes, out / EXPORT_INFO]
    plain_mode(*(f for path in written for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()))
    return out


def merged_export(checkpoint_dir, out, weights: str = "ema", model: Optional[str] = None,
                  model_config: Optional[str] = None, dtype: str = "fp32") -> Path:
    """Write the checkpoint's model as one diffusers folder (module docstring); returns out. model / model_config:
    the base model (default: the run's model.pretrained and model.config); dtype: of the weights written."""
    import tempfile

    from fastfair.evaluation.sources import resolve_model, resolve_model_config
    from fastfair.models import load_stable_diffusion, torch_dtype

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    problem = file_instead_of_folder("--out", out, "the model --merged writes")
    if problem:
        raise ValueError(problem)
    if out.is_dir() and any(out.iterdir()):  # a model folder of two exports mixes them
        raise ValueError(f"--out {out}: not an empty folder; --merged writes a whole model: give a new folder")
    if model is None and model_config is not None:  # it would go unread: the run's model.config is used
        raise ValueError(f"--model-config {model_config} goes with --model (the run's own base model is read with "
                         "its own model.config)")
    with tempfile.TemporaryDirectory() as temporary:
        parts_dir = export(checkpoint_dir, Path(temporary) / "export", weights)  # checks the checkpoint first
        info = export_info(parts_dir)
        if model is None:
            cfg = load_config(config_file(checkpoint_dir))
            model, model_config = cfg.model.pretrained, cfg.model.config
        # fp32 whatever dtype: LoRA is fused at full precision, then the weights are cast once
        parts = load_stable_diffusion(resolve_model(model), "fp32", config=resolve_model_config(model_config),
                                      key="--model", config_key="--model-config")
        pipe = parts.pipeline()
        try:
            prefix = load_into_pipeline(pipe, parts_dir, "--merged")
        except ValueError as error:  # it names the temporary folder: name the checkpoint
            raise ValueError(str(error).replace(f"--merged {parts_dir}", f"{checkpoint_dir}")) from None
        if export_contents(parts_dir) == LORA_FILE:  # into the weights they adapt, then the adapters dropped
            pipe.fuse_lora(components=[name for name in ("unet", "text_encoder")
                                       if getattr(pipe, name) is not None], lora_scale=1.0)
            pipe.unload_lora_weights()
        pipe.to(dtype=torch_dtype(dtype))
        # the layout every transformers major reads (transformers 5's own left a 4.x text encoder random)
        save_pipeline_folder(pipe, str(out))
    info.update(merged=True, model=str(model), prompt_prefix=prefix)
    write_text(out / EXPORT_INFO, json.dumps(info, indent=1) + "\n")
    plain_mode(*(f for f in out.rglob("*") if f.is_file()))
    return out


def export_info(folder) -> dict:
    """The sampling settings an export recorded (`EXPORT_INFO`); {} for an export written before it did."""
    path = Path(folder) / EXPORT_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ValueError(f"{path}: not valid JSON; export the checkpoint again") from None
    return info if isinstance(info, dict) else {}


def merged_prompt_prefix(model_folder) -> str:
    """The text a model written by `merged_export` needs before each prompt (a prefix run's token), '' for any
    other model."""
    folder = Path(model_folder)
    info = export_info(folder) if folder.is_dir() else {}
    return str(info.get("prompt_prefix", "")) if info.get("merged") else ""


def load_into_pipeline(pipe, lora_dir, flag: str = "--lora") -> str:
    """Apply an export folder to a StableDiffusionPipeline; returns the text to put before each prompt. flag: the
    command-line flag that named the folder (generate's --lora, evaluate's --finetuned), for the messages."""
    lora_dir = Path(lora_dir)
    kind = export_contents(lora_dir, flag)
    if kind is None:
        raise ValueError(f"{flag} {lora_dir}: expected {LORA_FILE}, {PREFIX_FILE} or unet/ written by fastfair.export")
    if kind == PREFIX_FILE and PREFIX_TOKEN in pipe.tokenizer.get_vocab():  # diffusers would blame the token
        raise ValueError(f"{flag} {lora_dir}: prefix tokens, and the --model holds a prefix run's already (a model "
                         "written by python -m fastfair.export --merged): use the original base model")
    from safetensors import SafetensorError

    try:
        return _apply_export(pipe, lora_dir, kind)
    except (SafetensorError, OSError) as error:  # a file cut short, or a folder lacking its weights
        raise ValueError(f"{flag} {lora_dir}: its {kind} cannot be read ({str(error).splitlines()[0][:300]}); export "
                         "the checkpoint again (python -m fastfair.export CKPT --out DIR)") from error
    except (RuntimeError, ValueError) as error:  # diffusers' and torch's shape messages name neither folder
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "mismatch" in line), lines[0])  # torch's names the tensor
        raise ValueError(f"{flag} {lora_dir}: its {kind} does not fit the --model ({reason[:300]}); export a "
                         "checkpoint of a run trained on this model") from error


def _apply_export(pipe, lora_dir: Path, kind: str) -> str:
    if kind == PREFIX_FILE:
        from safetensors import safe_open

        with safe_open(str(lora_dir / PREFIX_FILE), "pt") as prefix:
            if "emb_params" not in prefix.keys():
                raise OSError(f"no emb_params tensor in {PREFIX_FILE}, as fastfair writes it")
            width = prefix.get_slice("emb_params").get_shape()[-1]
        expected = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
        if width != expected:  # diffusers' own message leaves its placeholders unfilled
            raise ValueError(f"its tokens are {width} wide, the model's text encoder embeds tokens {expected} wide")
        pipe.load_textual_inversion(str(lora_dir / PREFIX_FILE), token=PREFIX_TOKEN)
        return PREFIX_TOKEN + " "
    if kind == UNET_DIR:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(lora_dir / UNET_DIR, local_files_only=True)
        if unet.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:  # it would fail only when called
            raise ValueError(f"its U-Net reads text of width {unet.config.cross_attention_dim}, the model's text "
                             f"encoder gives {pipe.unet.config.cross_attention_dim}")
        pipe.unet = unet.to(pipe.device, pipe.unet.dtype)
        return ""
    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open

    with safe_open(str(lora_dir / LORA_FILE), "pt") as weights:
        text_only = not any(key.startswith("unet.") for key in weights.keys())
    # a text-encoder LoRA has no U-Net keys, and diffusers then logs "No LoRA keys associated to
    # UNet2DConditionModel ... open an issue": expected there, not a problem to report (any other LoRA keeps
    # diffusers' warnings, e.g. of keys it did not load)
    verbosity = diffusers_logging.get_verbosity()
    if text_only:
        diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastfair.export", description="Export a fastfair checkpoint for "
                                     "diffusers.")
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/gender/checkpoints/step_00000200")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"), help="EMA (default) or raw weights")
    parser.add_argument("--merged", action="store_true",
                        help="write a whole diffusers model instead: the base model with the finetuned weights in "
                             "place (LoRA fused), loadable with StableDiffusionPipeline.from_pretrained")
    parser.add_argument("--model", default=None,
                        help="with --merged: the base model (default: the run's model.pretrained)")
    parser.add_argument("--model-config", default=None,
                        help="with --merged and a single-file --model: a local diffusers folder of its architecture")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="with --merged: the dtype of the weights written")
    args = parser.parse_args(argv)
    run = Path(args.checkpoint)
    if (run / "checkpoints").is_dir() and not has_weights(run):  # a run's output folder, as generate says too
        found = list_checkpoints(run, resumable=False)
        fix = f"pass one of its checkpoints, e.g. {found[max(found)]}" if found else "it has no checkpoint yet"
        raise ValueError(f"{run}: a training run's folder, not a checkpoint; {fix}")
    if not args.merged:
        given = [flag for flag, value in (("--model", args.model), ("--model-config", args.model_config),
                                          ("--dtype", args.dtype != "fp32" or None)) if value]
        if given:
            parser.error(f"{', '.join(given)} go with --merged")
        print(export(args.checkpoint, args.out, args.weights))
        return
    print(merged_export(args.checkpoint, args.out, args.weights, args.model, args.model_config, args.dtype))


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.export"):
        main()
