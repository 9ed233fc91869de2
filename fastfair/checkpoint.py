"""Training checkpoints: atomic writes, retention, resume.

A checkpoint is a folder ``<output_dir>/checkpoints/step_<iteration:08d>/`` holding
- ``weights.safetensors`` and ``ema.safetensors``: the trainable weights and their EMA, by stable name
  (``stable_name``: the same whichever transformers major trained them; ``for_model`` maps them back);
- ``state.pt``: optimizer and LR-scheduler state, RNG states, iteration, prompt-mixture position, counters
  (read back with ``torch.load(weights_only=True)``: tensors and plain Python values, plus, for a DeepSpeed run,
  DeepSpeed's optimizer state, which only a resume under DeepSpeed allows: ``fastfair.zero``).
Export and evaluation read the weights only (``load_weights``), so they take any run's checkpoint.
It is written into a hidden temp folder and renamed into place, so a kill during a save leaves the last
good checkpoint untouched. Retention keeps the newest ``keep_last`` plus every ``keep_every``-th iteration.
"""
from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastfair.faces.files import plain_mode

_NAME = re.compile(r"^step_(\d{8})$")
# CLIPTextModel's submodules; transformers 5 puts them at the top, 4.x (and every published SD LoRA) under text_model.
_CLIP_TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def stable_name(name: str) -> str:
    """A trainable weight's name as checkpoints and exports write it: the text encoder's under ``text_model.``.

    'text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.default.weight' (transformers 5, which flattened
    CLIPTextModel) -> 'text_encoder.text_model.encoder.layers.0...' (transformers 4's name); any other name is
    returned as is. So a checkpoint or LoRA written under one major loads under the other.
    """
    part, _, rest = name.partition(".")
    if part == "text_encoder" and rest.startswith(_CLIP_TEXT_ROOTS):
        return f"text_encoder.text_model.{rest}"
    return name


def stable_names(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {stable_name(name): t for name, t in tensors.items()}


def for_model(tensors: Dict[str, torch.Tensor], model: Dict[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors (by stable or model name) keyed by the names of ``model`` (name -> its tensor); raises
    when the names or shapes differ (``what`` starts the message: the setting or argument that named the
    checkpoint)."""
    by_stable = {stable_name(name): name for name in model}
    tensors = stable_names(tensors)
    differing = sorted(set(by_stable) ^ set(tensors))
    if differing:
        raise ValueError(f"{what}: its weights are not this model's trainable weights (differing names, e.g. "
                         f"{differing[:3]}; another finetune.target or LoRA setting?)")
    reshaped = [f"{name} {list(t.shape)} here {list(model[by_stable[name]].shape)}" for name, t in tensors.items()
                if t.shape != model[by_stable[name]].shape]
    if reshaped:
        raise ValueError(f"{what}: its weights have other shapes than this model's ({len(reshaped)}, e.g. "
                         f"{reshaped[0]}; another finetune.lora.rank or prefix_tokens?)")
    return {by_stable[name]: t for name, t in tensors.items()}


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


WEIGHT_FILES = ("weights.safetensors", "ema.safetensors")


def has_weights(folder) -> bool:
    """Whether a folder holds a checkpoint's weights: all that export and evaluation read (its state.pt, the
    optimizer state a resume needs, is what one deletes to save space)."""
    return all((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def list_checkpoints(output_dir, resumable: bool = True) -> Dict[int, Path]:
    """{iteration: folder} of the checkpoints under output_dir (temp folders excluded) with their weights
    (``has_weights``: what export and evaluation take) and, if resumable, their state.pt too."""
    complete = is_resumable if resumable else has_weights
    return {iteration: folder for iteration, folder in step_folders(output_dir).items() if complete(folder)}


def is_resumable(folder) -> bool:
    """Whether a folder holds a checkpoint a run can resume: its weights and its state.pt."""
    return has_weights(folder) and (Path(folder) / "state.pt").is_file()


def step_folders(output_dir) -> Dict[int, Path]:
    """{iteration: folder} of every folder named like a checkpoint, complete or not."""
    root = checkpoint_dir(output_dir)
    matches = ((_NAME.match(folder.name), folder) for folder in (root.iterdir() if root.is_dir() else []))
    return dict(sorted((int(match.group(1)), folder) for match, folder in matches if match))


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous_cpu(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {stable_name(name): t.detach().to("cpu").contiguous() for name, t in tensors.items()}


CONFIG_FILE = "config.yaml"  # in a checkpoint folder: the settings it was trained with


def save_checkpoint(output_dir, iteration: int, weights: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor],
                    state: dict, keep_last: int = 3, keep_every: int = 0, config: Optional[dict] = None) -> Path:
    """Write checkpoint `iteration` atomically, then prune old ones; returns its folder. config: the run's resolved
    settings (fastfair.config.config_to_dict), written beside the weights as CONFIG_FILE."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least the newest checkpoint")
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{iteration:08d}"
    tmp = root / f".tmp-{final.name}"
    for unfinished in root.glob(".tmp-step_*"):  # left by a save that was interrupted: never a checkpoint
        shutil.rmtree(unfinished, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_contiguous_cpu(weights), str(tmp / "weights.safetensors"))
        save_file(_contiguous_cpu(ema), str(tmp / "ema.safetensors"))
        torch.save({**state, "iteration": iteration, "rng": rng_state()}, tmp / "state.pt")
        if config is not None:
            import yaml

            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
        plain_mode(*(f for f in tmp.iterdir() if f.is_file()))  # safetensors writes 0600
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk: torch.save's RuntimeError, or this
        written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise OSError(f"checkpoint {iteration} could not be written to {root} ({str(error).strip()[:200]}); "
                      f"{free / 2**20:.0f} MiB free there after {written / 2**20:.1f} MiB written: free space or "
                      "choose another output_dir, then resume=auto continues from the last checkpoint") from error
    if final.exists():  # a rerun writing the same iteration: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    prune(output_dir, keep_last, keep_every)
    return final


def prune(output_dir, keep_last: int, keep_every: int) -> None:
    """Delete checkpoints that are neither among the newest keep_last nor at a multiple of keep_every."""
    found = list_checkpoints(output_dir)
    newest = set(list(found)[-keep_last:])
    for iteration, folder in found.items():
        if iteration not in newest and not (keep_every and iteration % keep_every == 0):
            shutil.rmtree(folder)


def config_file(checkpoint) -> Path:
    """The settings a checkpoint was trained with: its own CONFIG_FILE; for checkpoints written before they held
    one, the run's config.yaml (<output_dir>/config.yaml beside checkpoints/, which a later resume rewrites)."""
    own = Path(checkpoint) / CONFIG_FILE
    return own if own.is_file() else Path(checkpoint).parent.parent / "config.yaml"


def trained_settings(checkpoint) -> Optional[dict]:
    """The settings mapping in ``config_file(checkpoint)``; None where none is recorded (or it is not a mapping)."""
    import yaml

    recorded = config_file(checkpoint)
    saved = yaml.safe_load(recorded.read_text()) if recorded.is_file() else None
    return saved if isinstance(saved, dict) else None


def resolve_resume(resume: str, output_dir) -> Optional[Path]:
    """'' -> None (fresh start); 'auto' -> the newest checkpoint in output_dir or None; else that folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        newest = max(found, default=-1)
        incomplete = {step: folder for step, folder in step_folders(output_dir).items() if step > newest}
        if incomplete:  # e.g. a file deleted or lost in a copy: say why those are passed over
            import warnings

            then = f"resuming from {found[newest]}" if found else "no complete checkpoint: a fresh start"
            warnings.warn("resume=auto: " + "; ".join(f"{folder} lacks {', '.join(_missing(folder))}"
                                                      for folder in incomplete.values()) + f"; {then}", stacklevel=2)
        return found[newest] if found else None
    path = Path(resume)
    if _missing(path):
        raise ValueError(f"resume={resume}: not a checkpoint folder: it lacks {', '.join(_missing(path))} (a "
                         "checkpoint is <output_dir>/checkpoints/step_N with state.pt, weights.safetensors, "
                         "ema.safetensors)")
    return path


def _missing(folder: Path, names=("state.pt", *WEIGHT_FILES)) -> List[str]:
    """The files among ``names`` (by default those of a resumable checkpoint) that the folder lacks."""
    return [name for name in names if not (Path(folder) / name).is_file()]


def load_weights(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(weights, ema) of a checkpoint folder by stable name (also from checkpoints written before names were made
    stable); its state.pt is not read."""
    path = Path(path)
    if not has_weights(path):
        lacking = ", ".join(_missing(path, WEIGHT_FILES))
        raise ValueError(f"{path}: not a checkpoint folder: it lacks {lacking} (expected weights.safetensors and "
                         "ema.safetensors, as in <output_dir>/checkpoints/step_00000200)")
    return tuple(stable_names(_read_safetensors(path / name)) for name in WEIGHT_FILES)


def _read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except SafetensorError as error:  # checkpoints are written atomically: a bad file was damaged or cut off later
        raise ValueError(f"{file}: cannot be read as safetensors ({error}); the file is damaged or was cut off "
                         "in a copy: copy it again, or use another checkpoint of the run") from None


def load_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], dict]:
    """(weights, ema, state) of a checkpoint folder (``load_weights`` and state.pt); RNG states are restored by
    the caller (`set_rng_state`)."""
    path = Path(path)
    weights, ema = load_weights(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "deepspeed" not in str(error):
            raise
        raise ValueError(f"{path}: a checkpoint of a DeepSpeed run (its state.pt holds DeepSpeed's optimizer "
                         "state); resume it with its deepspeed.config") from None
    except (RuntimeError, EOFError) as error:  # written atomically: a bad file was damaged or cut off later
        raise ValueError(f"{path / 'state.pt'}: cannot be read ({str(error).strip()[:200]}); the file is damaged or "
                         "was cut off in a copy: copy it again, or resume from another checkpoint of the run (its "
                         "weights still export)") from None
    return weights, ema, state
