"""Training checkpoints: atomic writes, retention, resume.

A checkpoint is a folder ``<output_dir>/checkpoints/step_<iteration:08d>/`` holding
- ``weights.safetensors`` and ``ema.safetensors``: the trainable weights and their EMA, by stable name
  (``stable_name``: the same whichever transformers major trained them; ``for_model`` maps them back);
- ``state.pt``: optimizer and LR-scheduler state, RNG states, iteration, prompt-mixture position, counters
  (read back with ``torch.load(weights_only=True)``: tensors and plain Python values, plus, for a DeepSpeed run,
  DeepSpeed's optimizer state, which only a resume under DeepSpeed allows: ``fastfair.zero``).
Export and evaluation read the weights only (``load_weights``), so they take any run's checkpoint.
It is written into a hidden temp folder (``.tmp-*``, named for the process), each file and the folder flushed to
disk, and renamed into place, so a kill or a power cut during a save leaves the last good checkpoint untouched.
Retention keeps the newest ``keep_last`` plus every ``keep_every``-th iteration; a pruned folder is renamed to a
temp name before it is deleted, so a kill mid-delete leaves no half checkpoint under a step name.

A training run holds ``<output_dir>/.lock`` (``output_dir_lock``) while it writes there: a second run in the same
output_dir is refused at start, and the saves of the holder remove temp folders any earlier process left.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastfair.files import NO_FILE_LOCKS, fsync_dir, fsync_file, plain_mode

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


def checkpoint_step(folder) -> Optional[int]:
    """The iteration a checkpoint folder's name (step_NNNNNNNN) gives; None for any other name."""
    match = _NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


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


_CHECKSUMS = "fastfair.crc32"  # a weight file's metadata key: {tensor name: CRC-32 of its bytes}, as JSON


def tensor_checksums(tensors: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """{name: CRC-32 of the tensor's bytes in memory order} for contiguous CPU tensors (any dtype)."""
    return {name: zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) for name, t in tensors.items()}


def _save_weights(tensors: Dict[str, torch.Tensor], file: Path) -> None:
    """A weight file with its tensors' checksums in its metadata: safetensors checks the header, not the bytes of
    the tensors, so bytes changed in place would load as other weights (`_read_safetensors` checks them)."""
    save_file(tensors, str(file), metadata={_CHECKSUMS: json.dumps(tensor_checksums(tensors))})


CONFIG_FILE = "config.yaml"  # in a checkpoint folder: the settings it was trained with
LOCK_FILE = ".lock"  # in output_dir: held by the run writing there (output_dir_lock)
_TEMP = ".tmp-"  # the prefix of every folder a save or a prune works in; never a checkpoint
_LOCKED: Set[str] = set()  # the output_dirs (resolved) whose lock this process holds


def _owner() -> str:
    """This process as temp folders name it: host and pid (a pid alone repeats across the nodes of a shared disk)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def holds_lock(output_dir) -> bool:
    """Whether this process holds output_dir's lock (``output_dir_lock``)."""
    return str(Path(output_dir).resolve()) in _LOCKED


def lock_holder(output_dir) -> str:
    """Who holds output_dir's lock, as its lock file says: 'host H, pid P, since T' (or why it cannot say)."""
    try:
        held = json.loads((Path(output_dir) / LOCK_FILE).read_text())
        return f"host {held['host']}, pid {held['pid']}, since {held['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # taken a moment ago, its details not written yet
        return "its host and pid not recorded yet"


@contextlib.contextmanager
def output_dir_lock(output_dir) -> Iterator[Path]:
    """Hold an exclusive lock on output_dir while a run writes there: a non-blocking ``flock`` on
    ``<output_dir>/.lock``, which records the holder's host, pid and start time; released when the block ends (a
    killed process's lock is released by the system). Raises ValueError naming the holder when another process
    holds it (two runs in one output_dir delete each other's saves in progress and interleave metrics.jsonl). A
    filesystem that does not lock (Lustre mounted without ``-o flock``, NFS without its lock daemon) gets a
    warning, and the run goes on unlocked."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as error:  # e.g. another user's run left it in a group-shared folder
        raise OSError(f"output_dir={output_dir}: cannot open its lock file {path} ({error.strerror}): give this user "
                      "write access to it (it records which run trains there), or choose another output_dir") from None
    key, locked = str(folder.resolve()), False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ValueError(f"output_dir={output_dir} is in use by another run ({lock_holder(folder)}; lock file "
                             f"{path}): two runs in one output_dir overwrite each other's checkpoints and metrics. "
                             "Wait for it to finish (or stop it), or give this run another output_dir") from None
        except OSError as error:
            if error.errno not in NO_FILE_LOCKS:
                raise
            warnings.warn(f"output_dir={output_dir}: its filesystem does not lock files ({error.strerror}), so a "
                          "second run started in it would not be refused: make sure no other run uses it",
                          stacklevel=3)
        if locked:
            os.ftruncate(handle, 0)
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            os.write(handle, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
                              + "\n").encode())
            _LOCKED.add(key)
        yield path
    finally:
        if locked:
            _LOCKED.discard(key)
            with contextlib.suppress(OSError):
                os.ftruncate(handle, 0)  # a finished run holds nothing: no stale holder to name
        os.close(handle)  # releases the flock


STALE_TEMP_S = 3600  # a temp folder untouched this long is no save in progress (a save writes it within seconds)


def _remove_leftovers(root: Path, keep: Path) -> None:
    """Delete the temp folders earlier saves and prunes left (a kill mid-save or mid-delete): all of them while
    this process holds output_dir's lock (no other run writes there), else (a filesystem that does not lock) this
    process's own and those untouched for STALE_TEMP_S (another process's may be a save in progress)."""
    mine = f".{_owner()}"
    every = holds_lock(root.parent)
    for leftover in root.glob(f"{_TEMP}*"):
        if leftover == keep:
            continue
        try:
            stale = time.time() - leftover.stat().st_mtime > STALE_TEMP_S
        except OSError:  # removed meanwhile
            continue
        if every or stale or leftover.name.endswith(mine):
            shutil.rmtree(leftover, ignore_errors=True)


def _set_aside(folder: Path, why: str) -> Path:
    """Rename a checkpoint folder to a temp name (one step) before it is deleted: a kill mid-delete then leaves a
    temp folder the next save removes, never a step folder missing some files."""
    aside = folder.with_name(f"{_TEMP}{why}-{folder.name}.{_owner()}")
    os.rename(folder, aside)
    return aside


def library_versions() -> Dict[str, str]:
    """The versions of fastfair and the libraries whose numerics a run depends on (saved in each state.pt; a
    resume under others warns)."""
    from importlib.metadata import PackageNotFoundError, version

    import fastfair

    found = {"fastfair": str(fastfair.__version__), "torch": str(torch.__version__)}  # plain str: torch's is
    # a TorchVersion, which a weights_only load refuses
    for name in ("diffusers", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def version_changes(saved: Optional[dict]) -> Dict[str, Tuple[str, str]]:
    """{library: (saved version, this process's)} where they differ; {} for a checkpoint that saved none."""
    now = library_versions()
    return {name: (old, now.get(name, "not installed")) for name, old in (saved or {}).items()
            if now.get(name, "not installed") != old}


def save_checkpoint(output_dir, iteration: int, weights: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor],
                    state: dict, keep_last: int = 3, keep_every: int = 0, config: Optional[dict] = None) -> Path:
    """Write checkpoint `iteration` atomically, then prune old ones; returns its folder. config: the run's resolved
    settings (fastfair.config.config_to_dict), written beside the weights as CONFIG_FILE."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least the newest checkpoint")
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{iteration:08d}"
    tmp = root / f"{_TEMP}{final.name}.{_owner()}"  # this process's own: another's save never shares it
    _remove_leftovers(root, keep=tmp)
    if tmp.exists():  # this process's, from a save interrupted in it (KeyboardInterrupt caught by a caller)
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_weights(_contiguous_cpu(weights), tmp / "weights.safetensors")
        _save_weights(_contiguous_cpu(ema), tmp / "ema.safetensors")
        torch.save({**state, "iteration": iteration, "rng": rng_state(), "versions": library_versions()},
                   tmp / "state.pt")
        if config is not None:
            import yaml

            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
        files = [f for f in tmp.iterdir() if f.is_file()]
        plain_mode(*files)  # safetensors writes 0600
        # on disk before the rename publishes them: else a power cut or node crash soon after can leave a
        # checkpoint of empty or cut-off files under the step name, which resume=auto would pick
        for file in files:
            fsync_file(file)
        fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk: torch.save's RuntimeError, or this
        written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise OSError(f"checkpoint {iteration} could not be written to {root} ({str(error).strip()[:200]}); "
                      f"{free / 2**20:.0f} MiB free there after {written / 2**20:.1f} MiB written: free space or "
                      "choose another output_dir, then resume=auto continues from the last checkpoint") from error
    # a rerun writing the same iteration: the old one moves aside whole, then goes
    replaced = _set_aside(final, "replaced") if final.exists() else None
    os.rename(tmp, final)
    fsync_dir(root)  # the rename itself
    if replaced is not None:
        shutil.rmtree(replaced)
    prune(output_dir, keep_last, keep_every)
    return final


def prune(output_dir, keep_last: int, keep_every: int) -> None:
    """Delete checkpoints that are neither among the newest keep_last nor at a multiple of keep_every."""
    found = list_checkpoints(output_dir)
    newest = set(list(found)[-keep_last:])
    for iteration, folder in found.items():
        if iteration not in newest and not (keep_every and iteration % keep_every == 0):
            shutil.rmtree(_set_aside(folder, "delete"))


def config_file(checkpoint) -> Path:
    """The settings a checkpoint was trained with: its own CONFIG_FILE; for checkpoints written before they held
    one, the run's config.yaml (<output_dir>/config.yaml beside checkpoints/, which a later resume rewrites)."""
    own = Path(checkpoint) / CONFIG_FILE
    # resolved: a checkpoint named through a link is beside its own run's config.yaml, not the link's
    return own if own.is_file() else Path(checkpoint).resolve().parent.parent / "config.yaml"


def trained_settings(checkpoint) -> Optional[dict]:
    """The settings mapping in ``config_file(checkpoint)``; None where no file records them; a ValueError naming
    the file where it is damaged (empty, not YAML, not a mapping): the settings a resume is checked against."""
    import yaml

    recorded = config_file(checkpoint)
    if not recorded.is_file():
        return None
    try:
        saved = yaml.safe_load(recorded.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        saved = error
    if isinstance(saved, dict):
        return saved
    why = ("empty" if saved is None else f"not YAML: {str(saved).splitlines()[0]}" if isinstance(saved, Exception)
           else f"a {type(saved).__name__}, not the mapping of settings fastfair writes")
    raise ValueError(f"{recorded}: the settings {Path(checkpoint).name} was trained with cannot be read ({why}); the "
                     "file is damaged: restore it from a copy, or write it with python fastfair/train.py "
                     "--print-config and the settings the run was started with")


def resolve_resume(resume: str, output_dir) -> Optional[Path]:
    """'' -> None (fresh start); 'auto' -> the newest resumable checkpoint in output_dir or None; else that
    folder."""
    if not resume:
        return None
    if resume == "auto":  # step folders past it that cannot be resumed (they lack state.pt or a weight file) are
        # passed over here; a run then refuses to overwrite them (Trainer._check_output_dir says what they lack)
        found = list_checkpoints(output_dir)
        return found[max(found)] if found else None
    path = Path(resume)
    if missing_files(path):
        raise ValueError(f"resume={resume}: not a checkpoint folder: it lacks {', '.join(missing_files(path))} (a "
                         "checkpoint is <output_dir>/checkpoints/step_N with state.pt, weights.safetensors, "
                         "ema.safetensors)")
    return path


def missing_files(folder, names=("state.pt", *WEIGHT_FILES)) -> List[str]:
    """The files among ``names`` (by default those of a resumable checkpoint) that the folder lacks."""
    return [name for name in names if not (Path(folder) / name).is_file()]


def load_weights(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(weights, ema) of a checkpoint folder by stable name (also from checkpoints written before names were made
    stable); its state.pt is not read."""
    path = Path(path)
    if not has_weights(path):
        lacking = ", ".join(missing_files(path, WEIGHT_FILES))
        raise ValueError(f"{path}: not a checkpoint folder: it lacks {lacking} (expected weights.safetensors and "
                         "ema.safetensors, as in <output_dir>/checkpoints/step_00000200)")
    return tuple(stable_names(_read_safetensors(path / name)) for name in WEIGHT_FILES)


def _read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint's weight file, checked against the checksums it was saved with (files written
    before checkpoints held them are read unchecked)."""
    def damaged(why: str) -> ValueError:  # checkpoints are written atomically: a bad file was damaged later
        return ValueError(f"{file}: {why}; the file is damaged or was cut off in a copy: copy it again, or use "
                          "another checkpoint of the run")
    try:  # one read: the tensors and the metadata holding their checksums
        with safe_open(str(file), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(_CHECKSUMS)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        raise damaged(f"cannot be read as safetensors ({error})") from None
    if recorded is not None:
        try:
            expected = json.loads(recorded)
        except ValueError:
            expected = None
        if not isinstance(expected, dict):
            raise damaged("its recorded checksums cannot be read")
        actual = tensor_checksums(tensors)
        failing = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
        if failing:
            raise damaged(f"the checksums of {len(failing)} tensor(s) fail (e.g. {failing[0]})")
    return tensors


def load_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], dict]:
    """(weights, ema, state) of a checkpoint folder (``load_weights`` and state.pt); RNG states are restored by
    the caller (`set_rng_state`)."""
    path = Path(path)
    weights, ema = load_weights(path)
    state_file = path / "state.pt"

    def damaged(why: str) -> ValueError:  # written atomically: a bad file was damaged or cut off later
        return ValueError(f"{state_file}: cannot be read ({why[:200]}); the file is damaged or was cut off in a "
                          "copy: copy it again, or move this checkpoint away (its weights still export) and "
                          "resume=auto continues from the one before")
    try:  # torch.save's zip archive keeps a CRC per tensor, which torch.load does not check: bytes changed in place
        with zipfile.ZipFile(state_file) as archive:
            failing = archive.testzip()
    except (zipfile.BadZipFile, OSError):  # cut short, or not an archive: torch.load names it below
        failing = None
    if failing is not None:
        raise damaged(f"the checksum of {failing} inside it fails")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "deepspeed" not in str(error):
            raise damaged(str(error).strip().splitlines()[0]) from None
        raise ValueError(f"{path}: a checkpoint of a DeepSpeed run (its state.pt holds DeepSpeed's optimizer "
                         "state); resume it with its deepspeed.config") from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        # how damaged bytes fail to unpickle (KeyError: a pickle memo); an OSError (permissions, I/O) is not damage
        raise damaged(f"{type(error).__name__}: {str(error).strip()}") from None
    return weights, ema, state
