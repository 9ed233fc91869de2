"""Build a face bank from a folder of real faces: detect, align, embed, save.

    python -m fastfair.faces.build_bank --images DIR --out bank.safetensors --embedder sfnet20.pth

Every image file below DIR (sorted by relative path; symlinked folders followed, each real folder read once)
is read, its largest face detected and aligned to 112 x 112, embedded (flip-sum, unit norm) and stored with its
file name. Unreadable images (including those above PIL's decompression-bomb limit) and images without a face are
skipped and counted. Progress is saved atomically to ``OUT.partial.safetensors`` every few batches; running the
same command again resumes from it (the result equals an uninterrupted build of the folder as it is now: files
removed since are left out), ``--restart`` discards it. A resume with another ``--embedder`` file, or the same
path rewritten since (size, mtime), is refused.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from fastfair.cli import folder_instead_of_file
from fastfair.faces.align import align_faces
from fastfair.faces.bank import FaceBank, json_mapping
from fastfair.faces.detect import detector_from_flags, get_detector
from fastfair.faces.embed import FaceEmbedder, load_face_embedder
from fastfair.files import save_safetensors
from fastfair.faces.regions import locate_faces
from fastfair.hooks import load_callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EMBEDDER_FILE = "embedder_file"  # settings key: the --embedder checkpoint's {path, size, mtime_ns}


@dataclass
class BankProgress:
    """What a (partial) build has done: embedded files in order, and the skipped ones."""

    embedded: List[str] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)
    no_face: List[str] = field(default_factory=list)
    settings: str = ""

    def done(self) -> set:
        return set(self.embedded) | set(self.unreadable) | set(self.no_face)


def list_images(folder: str) -> List[str]:
    """Image files below ``folder`` as sorted relative paths (by suffix; unreadable ones are found later)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images folder not found: {folder}")
    found, visited = [], set()
    # symlinked sub-folders are followed (a bank folder is often links to the datasets); a link back up the tree
    # (a cycle) or a second link to a folder already read is skipped by its real path
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()  # a deterministic walk: which of two links to one folder names its files
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def read_image(path: str) -> Optional[torch.Tensor]:
    """[1, 3, H, W] in [-1, 1], or None when the file cannot be decoded (or is past PIL's decompression-bomb
    limit: read_rgb's ValueError)."""
    from fastfair.image_files import read_rgb

    try:
        rgb = read_rgb(path)
    except (OSError, ValueError, SyntaxError):
        return None
    if rgb.ndim != 3 or min(rgb.shape[:2]) == 0:
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1


def partial_path(out: str) -> str:
    return out + ".partial.safetensors"


def file_fingerprint(path: str) -> dict:
    """A weights file's absolute path, size and mtime: a rewrite under the same path changes them."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resumed_settings(path: str, saved: str, settings: str) -> str:
    """The settings to record when resuming the partial build ``path`` made with ``saved``; raises unless they
    match ``settings``. One made before the embedder file's fingerprint was recorded resumes with a note."""
    if saved == settings:
        return settings
    old, new = json_mapping(saved), json_mapping(settings)
    if old is not None and new is not None:
        same_rest = ({k: v for k, v in old.items() if k != EMBEDDER_FILE}
                     == {k: v for k, v in new.items() if k != EMBEDDER_FILE})
        if same_rest and EMBEDDER_FILE not in old:
            print(f"note: {path} does not record the embedder file's size and mtime (an older build): resuming, "
                  f"unchecked, on the assumption that {new.get('embedder')} is unchanged since", file=sys.stderr)
            return settings
        if same_rest and EMBEDDER_FILE in new:
            raise ValueError(f"{path}: the --embedder file changed since the partial build ({old[EMBEDDER_FILE]}, "
                             f"now {new[EMBEDDER_FILE]}): the bank would mix the embeddings of two models; put the "
                             "old file back, or pass --restart to start over with this one")
    raise ValueError(f"{path} was made with other settings ({saved}); "
                     "rerun with those settings, or pass --restart to start over")


def load_progress(out: str, settings: str):
    """(progress, embeddings list) from the partial file, or fresh ones when there is none."""
    path = partial_path(out)
    if not os.path.isfile(path):
        return BankProgress(settings=settings), []
    from safetensors.torch import load_file
    from fastfair.files import read_safetensors_metadata

    progress = BankProgress(**json.loads(read_safetensors_metadata(path)["progress"]))
    progress.settings = resumed_settings(path, progress.settings, settings)
    embeddings = load_file(path)["embeddings"]
    return progress, [embeddings] if embeddings.numel() else []


def keep_current(progress: BankProgress, embeddings: List[torch.Tensor], files: List[str], image_dir: str):
    """The progress (and embeddings) of the files still in the folder: one removed or moved since the partial
    save would stay in the bank, and in the summary's counts, though no longer among its images."""
    current = set(files)
    gone = [name for name in progress.done() if name not in current]
    if not gone:
        return progress, embeddings
    print(f"note: {len(gone)} file(s) of the partial build are no longer in {image_dir} (e.g. {sorted(gone)[0]}): "
          "left out of the bank", file=sys.stderr)
    keep = torch.tensor([name in current for name in progress.embedded], dtype=torch.bool)
    if embeddings and not keep.all():
        kept = torch.cat(embeddings)[keep]
        embeddings = [kept] if len(kept) else []
    return BankProgress(*[[name for name in names if name in current]
                          for names in (progress.embedded, progress.unreadable, progress.no_face)],
                        settings=progress.settings), embeddings


def save_progress(out: str, progress: BankProgress, embeddings: List[torch.Tensor]):
    stacked = torch.cat(embeddings) if embeddings else torch.zeros(0, 0)
    save_safetensors({"embeddings": stacked}, partial_path(out), {"progress": json.dumps(asdict(progress))})


def build_bank(image_dir: str, out: str, embedder: Callable, detector="opencv", batch_size: int = 32,
               save_every: int = 8, dtype=torch.float32, device="cpu", restart: bool = False,
               settings: str = "", progress_bar: bool = True) -> dict:
    """Build (or resume) the bank; returns a summary dict of counts.

    embedder: aligned faces [N, 3, 112, 112] in [-1, 1] -> unit embeddings [N, D] (e.g. a FaceEmbedder);
    detector: a backend name, Detector or callable; save_every: batches between progress saves;
    settings: a string identifying the embedder/detector, checked on resume.
    """
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be >= 1, got {batch_size} and {save_every}")
    detector = get_detector(detector)
    files = list_images(image_dir)
    if restart and os.path.exists(partial_path(out)):
        os.remove(partial_path(out))
    progress, embeddings = load_progress(out, settings)
    progress, embeddings = keep_current(progress, embeddings, files, image_dir)
    done = progress.done()
    todo = [name for name in files if name not in done]
    input_size = getattr(embedder, "input_size", 112)
    pending_faces, pending_names, batches = [], [], 0

    def flush():
        nonlocal batches
        with torch.no_grad():
            embeddings.append(embedder(torch.cat(pending_faces).to(device)).float().cpu())
        progress.embedded += pending_names
        pending_faces.clear(), pending_names.clear()
        batches += 1
        if batches % save_every == 0:
            save_progress(out, progress, embeddings)

    for name in tqdm(todo, desc="face bank", unit="img", disable=not progress_bar, initial=len(done),
                     total=len(files)):
        image = read_image(os.path.join(image_dir, name))
        if image is None:
            progress.unreadable.append(name)
            continue
        regions = locate_faces(image, detector)
        if not bool(regions.found[0]):
            progress.no_face.append(name)
            continue
        pending_faces.append(align_faces(image, regions.landmarks.float(), size=input_size))
        pending_names.append(name)
        if len(pending_faces) == batch_size:
            flush()
    if pending_faces:
        flush()
    summary = {"images": len(files), "embedded": len(progress.embedded), "unreadable": len(progress.unreadable),
               "no_face": len(progress.no_face)}
    if not progress.embedded:
        raise ValueError(f"no face was embedded from {len(files)} image(s) in {image_dir}: nothing to save")
    info = {"settings": progress.settings, "summary": json.dumps(summary)}
    # in file order, as an uninterrupted build of the folder (a resume appends files added since the partial save)
    order = sorted(range(len(progress.embedded)), key=progress.embedded.__getitem__)
    FaceBank(torch.cat(embeddings)[order], [progress.embedded[i] for i in order], info).save(out, dtype=dtype)
    if os.path.exists(partial_path(out)):
        os.remove(partial_path(out))
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastfair.faces.build_bank", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of real face images (searched recursively)")
    parser.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedder", help="local SFNet checkpoint (opensphere layout, .pth or .safetensors)")
    source.add_argument("--embedder-factory", help="'module:function' returning a [N,3,112,112] -> [N,D] model")
    parser.add_argument("--detector", default="opencv",
                        help="opencv | insightface | mtcnn | none (whole image) | module:function, or a "
                             "comma-separated list tried in order for the images the earlier ones find no face in "
                             "(e.g. insightface,mtcnn), as python -m fastfair.evaluate takes")
    parser.add_argument("--detector-path", help="insightface: the local model root (holding models/buffalo_l; "
                                                "default ~/.insightface)")
    parser.add_argument("--no-flip", action="store_true", help="do not add the mirrored face's features")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=8, help="batches between progress saves")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embeddings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--restart", action="store_true", help="ignore a partial build and start over")
    args = parser.parse_args(argv)
    problem = folder_instead_of_file("--out", args.out, "bank", "bank.safetensors")
    if problem:
        parser.error(problem)
    return args


def main(argv=None):
    args = parse_args(argv)
    detector = detector_from_flags(args.detector, args.detector_path)  # a bad spec fails before the embedder loads
    if args.embedder:
        embedder = load_face_embedder(args.embedder, flip=not args.no_flip)
    else:
        network = load_callable(args.embedder_factory, "--embedder-factory")()
        embedder = FaceEmbedder(network, flip=not args.no_flip)
    if isinstance(embedder, torch.nn.Module):
        embedder = embedder.to(args.device).eval()
    settings = {"embedder": args.embedder or args.embedder_factory, "detector": args.detector,
                "flip": not args.no_flip}
    if args.detector_path:  # recorded only when given: partial builds made before the flag still resume
        settings["detector_path"] = args.detector_path
    if args.embedder:  # a resume with the file rewritten under the same path is refused (resumed_settings); and
        # training compares its faces.embedding with the absolute path (fastfair.faces.bank.same_embedder)
        settings[EMBEDDER_FILE] = file_fingerprint(args.embedder)
    summary = build_bank(args.images, args.out, embedder, detector, args.batch_size, args.save_every,
                         getattr(torch, args.dtype), args.device, args.restart, json.dumps(settings))
    print(f"face bank: embedded {summary['embedded']} of {summary['images']} images; skipped "
          f"{summary['unreadable']} unreadable and {summary['no_face']} without a face -> {args.out}")
    return summary


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.faces.build_bank"):
        main()
