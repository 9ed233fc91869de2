"""The image cache: PNGs on disk plus a manifest, paired noise, and generation of exactly what is missing.

Layout under ``<out>/images/``: ``g<guidance>/<model>/p<prompt index:03d>/<image index:04d>.png`` and
``manifest.json`` = {"settings": what the images depend on, "images": {relative path: record}}.

Paired noise: image j of a prompt starts from z_T drawn from a generator seeded by (seed, crc32(prompt), j),
whatever the model, guidance scale or batch it is generated in. So base and finetuned images with the same
index share their noise, and a resumed run regenerates a missing image exactly.

A base-images folder (`fastfair.evaluate --base-images`) has the same layout with the base model's images only
and its settings only, so evaluations of several finetuned models share it; they take turns on its ``.lock``
(`shared_cache_lock`) while generating.

Resume: an image counts as cached when its PNG exists and the manifest records it for the same prompt text;
everything else is generated (in batches, with a progress bar) and the manifest is rewritten atomically after
each batch. A manifest written with other settings (model, steps, seed, ...) is refused (`StaleCacheError`);
the settings include a fingerprint of the models' weight files (`weight_fingerprint`), so new weights written
under the same path are refused too.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fastfair.dft import sample
from fastfair.files import NO_FILE_LOCKS, write_text
from fastfair.image_files import read_rgb

MANIFEST = "manifest.json"
# what a model folder's images depend on: weights, and the configs (scheduler, U-Net, tokenizer) beside them
# .yaml: a checkpoint's settings (fastfair.checkpoint.config_file); .txt/.model: tokenizer merges and vocabularies
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".yaml", ".txt", ".model")


def weight_fingerprint(path, only: Optional[Sequence[str]] = None) -> Dict[str, list]:
    """{relative path: [size, mtime_ns]} of the weight and config files under a folder (or of one file);
    {} when path is empty or absent. Cheap (no hashing of multi-GB files), yet it changes when a file is
    rewritten: a new export or a rerun's checkpoint under the same path. only: these relative paths alone (the
    files a reader takes from the folder; those absent are left out)."""
    if not path or not Path(path).exists():
        return {}
    root = Path(path)
    if only is not None:
        files = [root / name for name in only if (root / name).is_file()]
    else:
        files = [root] if root.is_file() else [
            file for file in root.rglob("*") if file.is_file() and file.suffix in FINGERPRINT_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(root).parts)]  # skip temp/hidden files
    fingerprint = {}
    for file in sorted(files):
        stat = file.stat()
        fingerprint[file.name if file == root else file.relative_to(root).as_posix()] = [stat.st_size,
                                                                                         stat.st_mtime_ns]
    return fingerprint


LOCK = ".lock"


@contextlib.contextmanager
def shared_cache_lock(root) -> Iterator[None]:
    """Hold `root`'s lock (a blocking ``flock`` on <root>/.lock) while one process reads the manifest and
    generates what is missing: evaluations sharing a base-images folder (`fastfair.select_checkpoint --shard`)
    take turns; the first generates, the others wait and then find the images cached. A filesystem that does
    not lock files is used unlocked, with a warning (as `fastfair.checkpoint.output_dir_lock` does)."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{folder}: another evaluation is generating images here; waiting for it", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in NO_FILE_LOCKS:
                raise
            warnings.warn(f"{folder}: its filesystem does not lock files ({error.strerror}), so evaluations started "
                          "together would not take turns on it: run one at a time", stacklevel=3)
        yield
    finally:
        os.close(handle)  # releases the flock


class StaleCacheError(ValueError):
    """The cache folder holds images made with other settings; ``changed`` names the settings that differ,
    ``problem`` is the message without its fix (``use another FLAG or delete the folder``), for a caller
    whose flags name the folder otherwise (`fastfair.select_checkpoint`)."""

    def __init__(self, problem: str, changed: Sequence[str], flag: str = "--out", fix: Optional[str] = None):
        super().__init__(f"{problem}; {fix or f'use another {flag} or delete the folder'}")
        self.problem, self.changed = problem, list(changed)


def _describe_change(key: str, old, new) -> str:
    """'key', or for a fingerprint 'key: the files that differ' so the error says which weights changed."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return key
    files = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"{key}: {shown} changed"


def noise_seed(seed: int, prompt: str, index: int) -> int:
    """The torch seed of image `index` of `prompt` (independent of batch, model and guidance)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(prompt.encode("utf-8")), index]).generate_state(1)[0])


def paired_noise(seed: int, prompt: str, indices: Sequence[int], shape) -> torch.Tensor:
    """z_T [len(indices), *shape] float32 on the CPU: row k from `noise_seed(seed, prompt, indices[k])`."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(
        noise_seed(seed, prompt, index))) for index in indices])


def image_path(guidance: float, model: str, prompt_index: int, index: int) -> str:
    """The cache-relative path of one image."""
    return f"g{guidance:g}/{model}/p{prompt_index:03d}/{index:04d}.png"


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> N RGB images (uint8)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def from_png(paths: Sequence[Path]) -> torch.Tensor:
    """PNG files -> [N, 3, H, W] float32 in [-1, 1]; a file that cannot be read is named (deleted, a rerun
    generates it again)."""
    arrays = []
    for path in paths:
        try:
            arrays.append(read_rgb(path))
        except (OSError, ValueError) as error:  # cut off or damaged since it was written (PIL: "truncated")
            raise ValueError(f"{path}: a cached image that cannot be read ({error}); delete it and rerun the same "
                             "command, which generates it again") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def _write_json(path: Path, data) -> None:
    """Write atomically through a temp file of this process's own (two writers never rename each other's)."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


@dataclass
class Job:
    """One image to produce: where it goes and what it shows."""

    path: str
    model: str
    guidance: float
    prompt_index: int
    prompt: str
    index: int


class ImageCache:
    """PNG cache with a manifest; `generated` lists the paths this object wrote (the resume check)."""

    def __init__(self, root, settings: dict, flag: str = "--out",
                 as_recorded_now: Optional[Callable[[dict], dict]] = None):
        """flag: the option that named root, for the fix in a refusal (``--base-images`` for a shared one).
        as_recorded_now: stored settings -> the settings this version records for the same inputs (a fingerprint
        narrowed since to the files the images depend on): cached images whose settings match only after it are
        kept, and the manifest records the settings as they are now."""
        self.root, self.flag = Path(root), flag
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        self.manifest = {"settings": self.settings, "images": {}}
        if (self.root / MANIFEST).is_file():
            try:
                stored = json.loads((self.root / MANIFEST).read_text())
            except ValueError:  # emptied or cut off (a full disk): its images cannot be trusted
                raise StaleCacheError(f"{self.root / MANIFEST}: unreadable", ["manifest"], flag) from None
            if (stored.get("settings") != self.settings and as_recorded_now is not None
                    and as_recorded_now(stored.get("settings", {})) == self.settings):
                stored["settings"] = self.settings
                _write_json(self.root / MANIFEST, stored)
            if stored.get("settings") != self.settings:
                old = stored.get("settings", {})
                changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                described = "; ".join(_describe_change(k, old.get(k), self.settings.get(k)) for k in changed)
                raise StaleCacheError(f"{self.root}: cached images were made with other settings ({described})",
                                      changed, flag)
            self.manifest = stored
        self.generated: List[str] = []

    def path(self, relative: str) -> Path:
        return self.root / relative

    def prompts_by_position(self) -> Dict[int, str]:
        """{prompt position: prompt} over every image the manifest records (image_path files them by position)."""
        found = {}
        for relative, record in self.manifest["images"].items():
            position = re.search(r"/p(\d+)/", relative)
            if position:
                found.setdefault(int(position.group(1)), record["prompt"])
        return found

    def has(self, job: Job) -> bool:
        record = self.manifest["images"].get(job.path)
        return record is not None and record["prompt"] == job.prompt and self.path(job.path).is_file()

    def missing(self, jobs: Sequence[Job]) -> List[Job]:
        return [job for job in jobs if not self.has(job)]

    def store(self, jobs: Sequence[Job], images: torch.Tensor) -> None:
        """Write the PNGs of jobs (images [N, 3, H, W] in [-1, 1]), then record them in the manifest."""
        # drop the records of the files about to be overwritten first: a run killed mid-batch must not leave
        # another prompt's record on a file that now holds this prompt's image
        dropped = [self.manifest["images"].pop(job.path, None) for job in jobs]
        if any(record is not None for record in dropped):
            _write_json(self.root / MANIFEST, self.manifest)
        for job, image in zip(jobs, to_pil(images)):
            target = self.path(job.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            self.manifest["images"][job.path] = {"prompt": job.prompt, "index": job.index, "model": job.model,
                                                 "guidance": job.guidance,
                                                 "noise_seed": noise_seed(self.settings["seed"], job.prompt,
                                                                          job.index)}
            self.generated.append(job.path)
        _write_json(self.root / MANIFEST, self.manifest)


@torch.no_grad()
def generate_missing(cache: ImageCache, jobs: Sequence[Job], sources: Dict, vae, scheduler, latent_shape,
                     num_steps: int, batch_size: int, device="cpu", progress: bool = True) -> int:
    """Sample and store every job the cache lacks, `batch_size` images per U-Net call; returns how many."""
    from tqdm.auto import tqdm

    todo = cache.missing(jobs)
    groups: Dict[tuple, List[Job]] = {}
    for job in todo:  # one prompt, model and guidance per batch: one embedding pair
        groups.setdefault((job.model, job.guidance, job.prompt), []).append(job)
    bar = tqdm(total=len(todo), desc="generating", unit="img", disable=not progress or not todo)
    for (model, guidance, prompt), group in groups.items():
        source = sources[model]
        cond, uncond = source.embeddings(prompt)
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            z_T = paired_noise(cache.settings["seed"], prompt, [job.index for job in batch], latent_shape)
            z_0 = sample(source.unet, scheduler, z_T.to(device), cond, uncond, num_steps=num_steps,
                         guidance_scale=guidance)
            images = vae.decode((z_0 / vae.config.scaling_factor).to(vae.dtype)).sample
            cache.store(batch, images)
            bar.update(len(batch))
    bar.close()
    return len(todo)
