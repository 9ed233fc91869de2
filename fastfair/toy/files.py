"""Where the toy weights live and how a small model is stored: ``NAME.safetensors`` + ``NAME.json``."""
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastfair.files import save_safetensors, write_text

WEIGHTS_DIR = Path(__file__).parent / "weights"
PIPELINE = "pipeline"  # the diffusers folder inside the weights folder
BUILD_RECORD = "build.json"


def weights_path(name: str, weights_dir: Optional[str] = None) -> str:
    """Path of ``name`` in the weights folder (default: the shipped one); FileNotFoundError if missing."""
    path = os.path.join(weights_dir or WEIGHTS_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the toy weights are made by `python -m fastfair.toy.build"
                                f"{'' if weights_dir is None else ' --out ' + str(weights_dir)}`")
    return path


def save_module(module: torch.nn.Module, folder: str, name: str, config: Dict) -> None:
    """Write the module's state dict to NAME.safetensors and its config (JSON-serializable) to NAME.json."""
    os.makedirs(folder, exist_ok=True)
    save_safetensors(module.state_dict(), os.path.join(folder, name + ".safetensors"))
    write_text(os.path.join(folder, name + ".json"), json.dumps(config, indent=2, sort_keys=True))


def load_module_files(name: str, weights_dir: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(state dict, config) stored by ``save_module``."""
    from safetensors.torch import load_file

    state = load_file(weights_path(name + ".safetensors", weights_dir))
    with open(weights_path(name + ".json", weights_dir), encoding="utf-8") as handle:
        return state, json.load(handle)


def load_module(name: str, build: Callable[[Dict], torch.nn.Module], weights_dir: Optional[str] = None):
    """``build(config)`` with the state dict stored by ``save_module`` loaded into it.

    The module is built under a forked torch generator: its random initialization is overwritten at once, and
    a loader called lazily inside a training iteration (the toy face detector) must not advance the global
    generator, whose state a checkpoint saves (a resumed run would otherwise draw differently from an
    uninterrupted one)."""
    state, config = load_module_files(name, weights_dir)
    with torch.random.fork_rng(devices=[]):
        module = build(config)
    module.load_state_dict(state)
    return module, config


# what a build writes beside PIPELINE and BUILD_RECORD: NAME.safetensors + NAME.json each
BUILT_MODULES = ("classifier_train", "classifier_eval", "detector", "face_bank")


def built_names() -> List[str]:
    """The names a build writes in its folder: BUILD_RECORD and BUILT_MODULES' files (PIPELINE is a folder)."""
    return [BUILD_RECORD] + [f"{name}{kind}" for name in BUILT_MODULES for kind in (".safetensors", ".json")]


def built_files(folder: str) -> List[Path]:
    """The files of a build in folder, sorted: PIPELINE's, BUILD_RECORD and BUILT_MODULES' (other files there are
    the user's, e.g. an --out folder that held something before)."""
    folder = Path(folder)
    return sorted([path for path in (folder / PIPELINE).rglob("*") if path.is_file()]
                  + [folder / name for name in built_names() if (folder / name).is_file()])


def make_world_readable(folder: str) -> None:
    """chmod 644 the build's files in folder (atomic saves create 600 temporary files)."""
    for path in built_files(folder):
        path.chmod(0o644)


def weight_checksums(folder: str) -> Dict[str, str]:
    """{relative path: sha256} of the build's .safetensors files in folder, sorted by path."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in built_files(folder) if path.suffix == ".safetensors"}


def combined_checksum(sums: Dict[str, str]) -> str:
    """One sha256 over the sorted (path, sha256) pairs: the build's fingerprint."""
    return hashlib.sha256("".join(f"{path}\t{digest}\n" for path, digest in sorted(sums.items())).encode()).hexdigest()
