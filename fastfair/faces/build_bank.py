"""Build a face bank from a folder of real faces: detect, align, embed, save.

    python -m fastfair.faces.build_bank --images DIR --out bank.safetensors --embedder sfnet20.pth

Every image file below DIR (sorted by relative path; symlinked folders followed, each real folder read once)
is read, its largest face detected and aligned to 112 x 112, embedded (flip-sum, unit norm) and stored with its
file name. Unreadable images (including those above PIL's decompression-bomb limit) and images without a face are
skipped and counted; so are folders that cannot be read. Progress is saved atomically to ``OUT.partial.safetensors``
every few batches; running the same command again resumes from it (the result equals an uninterrupted build of the
folder as it is now: files removed since are left out, files rewritten since (size, mtime) are read again),
``--restart`` discards it. A resume of another ``--images`` folder, with another ``--embedder`` file, or the same
path rewritten since (size, mtime), is refused.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from fastfair.cli import device_problem, folder_instead_of_file, whole_number
from fastfair.faces.align import align_faces
from fastfair.faces.bank import FaceBank, json_mapping
from fastfair.faces.detect import detector_from_flags, get_detector
from fastfair.faces.embed import as_face_embedder, load_face_embedder
from fastfair.files import save_safetensors, write_text
from fastfair.faces.regions import locate_faces
from fastfair.hooks import load_callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EMBEDDER_FILE = "embedder_file"  # settings key: the --embedder checkpoint's {path, size, mtime_ns}
IMAGES = "images"  # settings key: the --images folder's real path


@dataclass
class BankProgress:
    """What a (partial) build has done: embedded files in order, and the skipped ones."""

    embedded: List[str] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)
    no_face: List[str] = field(default_factory=list)
    settings: str = ""
    # per file read: [size, mtime_ns] before it was read (None: a partial build saved before they were recorded)
    stats: Optional[Dict[str, List[int]]] = field(default_factory=dict)

    def done(self) -> set:
        return set(self.embedded) | set(self.unreadable) | set(self.no_face)


def list_images(folder: str, unsearched: Optional[List[str]] = None) -> List[str]:
    """Image files below ``folder`` as sorted relative paths (by suffix; unreadable ones are found later).
    unsearched: gets the sub-folders that could not be listed (permissions, a link to a folder gone), relative."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ValueError(f"--images {folder} is a file: give the folder of face images")
        raise FileNotFoundError(f"--images folder not found: {folder}")
    found, visited, errors = [], set(), []
    # symlinked sub-folders are followed (a bank folder is often links to the datasets); a link back up the tree
    # (a cycle) or a second link to a folder already read is skipped by its real path
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=errors.append):
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()  # a deterministic walk: which of two links to one folder names its files
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    for error in errors:
        where = os.path.relpath(error.filename, folder)
        if where == ".":
            raise PermissionError(f"--images {folder}: cannot list its files ({error.strerror})")
        if unsearched is not None:
            unsearched.append(where)
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
    match ``settings``. One made before the embedder file's fingerprint, or the images folder, was recorded resumes
    with a note."""
    if saved == settings:
        return settings
    old, new = json_mapping(saved), json_mapping(settings)
    if old is not None and new is not None:
        unrecorded = [key for key in (EMBEDDER_FILE, IMAGES) if key in new and key not in old]
        differing = {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)} - set(unrecorded)
        if not differing:
            for key in unrecorded:
                what = (f"the embedder file's size and mtime (an older build): resuming, unchecked, on the "
                        f"assumption that {new.get('embedder')} is unchanged since" if key == EMBEDDER_FILE else
                        f"its --images folder (an older build): resuming, on the assumption that it is {new[key]}")
                print(f"note: {path} does not record {what}", file=sys.stderr)
            return settings
        if differing == {EMBEDDER_FILE}:
            raise ValueError(f"{path}: the --embedder file changed since the partial build ({old[EMBEDDER_FILE]}, "
                             f"now {new[EMBEDDER_FILE]}): the bank would mix the embeddings of two models; put the "
                             "old file back, or pass --restart to start over with this one")
        if differing == {IMAGES}:
            raise ValueError(f"{path} is the partial build of another --images folder ({old[IMAGES]}, now "
                             f"{new[IMAGES]}): its faces would be filed under this folder's names; pass that "
                             "--images to finish it, another --out for this folder, or --restart to discard it")
    raise ValueError(f"{path} was made with other settings ({saved}); "
                     "rerun with those settings, or pass --restart to start over")


def load_progress(out: str, settings: str):
    """(progress, embeddings list) from the partial file, or fresh ones when there is none."""
    path = partial_path(out)
    if not os.path.isfile(path):
        return BankProgress(settings=settings), []
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from fastfair.files import read_safetensors_metadata

    try:
        saved = json.loads(read_safetensors_metadata(path)["progress"])
        saved.setdefault("stats", None)  # an older build's: its files' sizes and mtimes unknown
        progress = BankProgress(**saved)
        embeddings = load_file(path)["embeddings"]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a partial face-bank build this version can resume ({type(error).__name__}: "
                         f"{error}); pass --restart to discard it and start over") from None
    progress.settings = resumed_settings(path, progress.settings, settings)
    return progress, [embeddings] if embeddings.numel() else []


def file_stat(path: str) -> List[int]:
    """[size, mtime_ns]: what tells a file rewritten since it was read."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def keep_current(progress: BankProgress, embeddings: List[torch.Tensor], files: List[str], image_dir: str):
    """The progress (and embeddings) of the files still in the folder as they were read: one removed or moved since
    the partial save would stay in the bank, and in the summary's counts, though no longer among its images; one
    rewritten since (size, mtime) would keep what it held before: both are dropped, and a rewritten one is read
    again."""
    current, already = set(files), progress.done()  # once: a set per listed file made a resume quadratic
    done = [name for name in files if name in already]
    gone = sorted(name for name in already if name not in current)
    if progress.stats is None:  # saved before they were recorded: taken as they are now, as its note says
        print(f"note: the partial build does not record the sizes and mtimes of the files it read (an older build): "
              f"resuming on the assumption that none of them changed in {image_dir} since", file=sys.stderr)
        progress.stats = {name: _stat_or_none(os.path.join(image_dir, name)) for name in done}
        changed = []
    else:
        changed = [name for name in done if progress.stats.get(name) != _stat_or_none(os.path.join(image_dir, name))]
    if gone:
        print(f"note: {len(gone)} file(s) of the partial build are no longer in {image_dir} (e.g. {gone[0]}): "
              "left out of the bank", file=sys.stderr)
    if changed:
        print(f"note: {len(changed)} file(s) of the partial build changed in {image_dir} since it read them (e.g. "
              f"{changed[0]}): read again", file=sys.stderr)
    drop = set(gone) | set(changed)
    if not drop:
        return progress, embeddings
    keep = torch.tensor([name not in drop for name in progress.embedded], dtype=torch.bool)
    if embeddings and not keep.all():
        kept = torch.cat(embeddings)[keep]
        embeddings = [kept] if len(kept) else []
    return BankProgress(*[[name for name in names if name not in drop]
                          for names in (progress.embedded, progress.unreadable, progress.no_face)],
                        settings=progress.settings,
                        stats={name: stat for name, stat in progress.stats.items() if name not in drop}), embeddings


def _stat_or_none(path: str) -> Optional[List[int]]:
    try:
        return file_stat(path)
    except OSError:  # gone since it was listed: unreadable now, and read again if it comes back
        return None


def save_progress(out: str, progress: BankProgress, embeddings: List[torch.Tensor]):
    stacked = torch.cat(embeddings) if embeddings else torch.zeros(0, 0)
    save_safetensors({"embeddings": stacked}, partial_path(out), {"progress": json.dumps(asdict(progress))})


def build_bank(image_dir: str, out: str, embedder: Callable, detector="opencv", batch_size: int = 32,
               save_every: int = 8, dtype=torch.float32, device="cpu", restart: bool = False,
               settings: str = "", progress_bar: bool = True) -> dict:
    """Build (or resume) the bank; returns a summary dict of counts.

    embedder: aligned faces [N, 3, 112, 112] in [-1, 1] -> unit embeddings [N, D] (e.g. a FaceEmbedder);
    detector: a backend name, Detector or callable; save_every: batches between progress saves (of a large bank,
    only once it grew by 5 % since the last: each save rewrites it whole);
    settings: a string identifying the embedder/detector, checked on resume.
    """
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be >= 1, got {batch_size} and {save_every}")
    detector = get_detector(detector)
    unsearched = []
    files = list_images(image_dir, unsearched)
    if unsearched:
        print(f"note: {len(unsearched)} folder(s) below {image_dir} could not be read (e.g. {unsearched[0]}): their "
              "images are not in the bank", file=sys.stderr)
    if restart and os.path.exists(partial_path(out)):
        os.remove(partial_path(out))
    progress, embeddings = load_progress(out, settings)
    progress, embeddings = keep_current(progress, embeddings, files, image_dir)
    done = progress.done()
    todo = [name for name in files if name not in done]
    input_size = getattr(embedder, "input_size", 112)
    pending_faces, pending_names, batches, saved = [], [], 0, len(progress.embedded)

    def flush():
        nonlocal batches, saved
        with torch.no_grad():
            features = embedder(torch.cat(pending_faces).to(device)).float().cpu()
        if embeddings and features.shape[1:] != embeddings[0].shape[1:]:
            raise ValueError(f"the embedder gives {features.shape[1]} features per face where the partial build "
                             f"{partial_path(out)} holds {embeddings[0].shape[1]}: the embedder changed since; pass "
                             "--restart to build the bank again with this one")
        embeddings.append(features)
        progress.embedded += pending_names
        pending_faces.clear(), pending_names.clear()
        batches += 1
        # each save rewrites every embedding so far: once the bank is large, only after it grew by a twentieth
        # (a 200k-image build wrote ~160 GB saving every 8 batches; a kill now loses at most that twentieth)
        if batches % save_every == 0 and (len(progress.embedded) - saved) * 20 >= len(progress.embedded):
            save_progress(out, progress, embeddings)
            saved = len(progress.embedded)

    for name in tqdm(todo, desc="face bank", unit="img", disable=not progress_bar, initial=len(done),
                     total=len(files)):
        path = os.path.join(image_dir, name)
        progress.stats[name] = _stat_or_none(path)  # before the read: a rewrite during it is read again on resume
        image = read_image(path)
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
               "no_face": len(progress.no_face), "unreadable_folders": len(unsearched)}
    if not progress.embedded:
        found = (f"{summary['unreadable']} unreadable, {summary['no_face']} without a face found" if files else
                 f"no file named *{', *'.join(IMAGE_SUFFIXES)} there")
        raise ValueError(f"no face was embedded from {len(files)} image(s) in {image_dir} ({found}): nothing to "
                         "save")
    info = {"settings": progress.settings, "summary": json.dumps(summary)}
    skipped = skipped_path(out)
    lists = (("unreadable", progress.unreadable), ("no face found", progress.no_face),
             ("folder not read", unsearched))
    if any(names for _, names in lists):  # the counts alone left the user to hunt for the files
        write_text(skipped, "".join(f"{why}\t{name}\n" for why, names in lists for name in names))
    elif os.path.exists(skipped):  # an earlier build's list, of files since fixed
        os.remove(skipped)
    # in file order, as an uninterrupted build of the folder (a resume appends files added since the partial save)
    order = sorted(range(len(progress.embedded)), key=progress.embedded.__getitem__)
    FaceBank(torch.cat(embeddings)[order], [progress.embedded[i] for i in order], info).save(out, dtype=dtype)
    if os.path.exists(partial_path(out)):
        os.remove(partial_path(out))
    return summary


def skipped_path(out: str) -> str:
    """The list of what a build at ``out`` skipped: a line 'why<TAB>relative path' each."""
    return out + ".skipped.txt"


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
    parser.add_argument("--batch-size", type=whole_number(1), default=32)
    parser.add_argument("--save-every", type=whole_number(1), default=8,
                        help="batches between progress saves (once the bank is large, a save also waits until it grew "
                             "by 5%%: each rewrites it whole)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embeddings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--restart", action="store_true", help="ignore a partial build and start over")
    args = parser.parse_args(argv)
    problem = device_problem("--device", args.device) or folder_instead_of_file("--out", args.out, "bank",
                                                                                "bank.safetensors")
    if not problem and args.embedder:
        if os.path.isdir(args.embedder):
            problem = f"--embedder {args.embedder} is a folder: give the SFNet checkpoint file (.pth or .safetensors)"
        elif os.path.exists(args.out) and os.path.exists(args.embedder) and os.path.samefile(args.out, args.embedder):
            problem = f"--out {args.out} is the --embedder file: give the bank its own file, e.g. bank.safetensors"
    if problem:
        parser.error(problem)
    return args


def _check_out_is_free(out: str) -> None:
    """A finished bank (or any other file) at --out is never replaced: only a build's own partial save is."""
    if os.path.exists(out) and not os.path.exists(partial_path(out)):
        raise ValueError(f"--out {out} exists already (a finished face bank, or another file) and this build would "
                         "replace it: choose another --out, or move or delete it first")


def factory_embedder(factory: str, no_flip: bool):
    """The embedder ``--embedder-factory`` names, as training takes ``faces.embedding_fn`` (fastfair.judges): a bare
    network [N, 3, S, S] -> [N, D] is wrapped in a FaceEmbedder at its ``input_size`` (112 if it names none), with
    --no-flip's choice; an embedder with its own ``flip`` setting (it flip-sums and normalizes itself) is used as
    it is, and --no-flip must agree with it."""
    embedder = as_face_embedder(load_callable(factory, "--embedder-factory")(), flip=not no_flip)
    if no_flip and embedder.flip:
        raise ValueError(f"--no-flip: --embedder-factory {factory} gives an embedder that adds the mirrored face's "
                         "features itself (flip=True); drop --no-flip, or have the factory give one with flip=False")
    return embedder


def main(argv=None):
    args = parse_args(argv)
    detector = detector_from_flags(args.detector, args.detector_path)  # a bad spec fails before the embedder loads
    _check_out_is_free(args.out)
    if args.embedder:
        try:
            embedder = load_face_embedder(args.embedder, flip=not args.no_flip)
        except ValueError as error:  # the loader's words say what the file lacks, not which flag gave it
            raise ValueError(f"--embedder {args.embedder}: {error}; give an SFNet checkpoint (opensphere layout, "
                             ".pth or .safetensors)") from None
    else:
        embedder = factory_embedder(args.embedder_factory, args.no_flip)
    if isinstance(embedder, torch.nn.Module):
        embedder = embedder.to(args.device).eval()
    settings = {"embedder": args.embedder or args.embedder_factory, "detector": args.detector,
                "flip": bool(embedder.flip), IMAGES: os.path.realpath(args.images)}
    if args.detector_path:  # recorded only when given: partial builds made before the flag still resume
        settings["detector_path"] = args.detector_path
    if args.embedder:  # a resume with the file rewritten under the same path is refused (resumed_settings); and
        # training compares its faces.embedding with the absolute path (fastfair.faces.bank.same_embedder)
        settings[EMBEDDER_FILE] = file_fingerprint(args.embedder)
    summary = build_bank(args.images, args.out, embedder, detector, args.batch_size, args.save_every,
                         getattr(torch, args.dtype), args.device, args.restart, json.dumps(settings))
    unsearched = (f"; {summary['unreadable_folders']} folder(s) could not be read"
                  if summary["unreadable_folders"] else "")
    skipped = summary["unreadable"] + summary["no_face"] + summary["unreadable_folders"]
    listed = f" (listed in {skipped_path(args.out)})" if skipped else ""
    print(f"face bank: embedded {summary['embedded']} of {summary['images']} images; skipped "
          f"{summary['unreadable']} unreadable and {summary['no_face']} without a face{unsearched}{listed} -> "
          f"{args.out}")
    return summary


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.faces.build_bank",
                     "the same command resumes from the last progress save"):
        main()
