"""Train a face-attribute classifier on a labelled folder (FairFace- or CelebA-style).

    python -m fastfair.classifiers.train --data DIR --labels labels.csv --attributes gender,race,age \\
        --out clf.safetensors

Loss: the sum over attributes of the cross-entropy of that attribute's logits. After every epoch the
validation split (``--val-labels`` or a seeded ``--val-fraction`` of the image files, of whole people with
``--groups``) is scored per attribute, by accuracy and balanced accuracy (the mean over classes of the share of
that class's images predicted right);
the epoch with the best mean balanced accuracy over attributes is written to ``--out``: with imbalanced labels
plain accuracy rewards predicting the majority class (0.9 for always "male" on 90% male rows; balanced: 0.5).
The full training state (weights, optimizer, RNG, data position, and the rows trained on) goes atomically to
``OUT.state.pt`` every ``--checkpoint-every`` steps and at each epoch end; ``--resume`` continues from it exactly
(same result as an uninterrupted run on the same machine), and refuses label tables that changed since.
Seed 0124: train the evaluation classifier separately (another ``--seed``, e.g. ``--arch small_cnn``).
"""
import argparse
import json
import math
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastfair.classifiers.data import (WHOLE_NUMBER, LabelledFaces, align_labels, class_key, file_key,
                                       image_problem, read_label_table, resolve_labels, row_groups, unique_rows)
from fastfair.classifiers.heads import AttributeHead
from fastfair.classifiers.model import ARCHITECTURES, AttributeClassifier, save_classifier
from fastfair.cli import device_problem, folder_instead_of_file
from fastfair.files import atomic_path, load_state_dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastfair.classifiers.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="image folder; file names in the label table are relative to it")
    parser.add_argument("--labels", required=True, help="label CSV (FairFace/CelebA columns) or list_attr_celeba.txt")
    parser.add_argument("--attributes", required=True, help="comma list: gender,race,age | celeba40 | column names")
    parser.add_argument("--out", required=True, help="classifier file to write (.safetensors)")
    parser.add_argument("--val-labels", help="separate validation table (same folder); default: a split")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of rows held out when no --val-labels (split by file: photos of one person may "
                        "land on both sides; --groups keeps each person's photos on one)")
    parser.add_argument("--groups", help="each image's group, e.g. the person it shows, kept whole on one side of the "
                        "split: a column of --labels, or a file of 'image group' lines (CelebA's identity_CelebA.txt) "
                        "or a CSV of file and group; with --val-labels, no group may have images in both tables")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mobilenet_v3_large")
    parser.add_argument("--width", type=int, default=16, help="small_cnn channel width")
    parser.add_argument("--init", help="initial network weights (torchvision layout, e.g. ImageNet); tensors of "
                        "another shape (a new head) are skipped; not read on --resume")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between training-state saves")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.state.pt when it exists")
    parser.add_argument("--max-steps", type=int, help="stop (saving the state) after this many steps in total; "
                        "a resumed run already there trains no further")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("epochs", "batch_size", "size", "checkpoint_every", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    # an infinite rate trained a NaN network, saved as the best epoch (its NaN logits scored 1.000)
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr {args.lr}: expected a finite learning rate > 0 (default 1e-3)")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay {args.weight_decay}: expected a finite number >= 0 (default 1e-4)")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: expected 0 (load in this process) or more")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps} (leave it out to train every epoch)")
    problem = device_problem("--device", args.device) or folder_instead_of_file("--out", args.out, "classifier",
                                                                                "gender.safetensors")
    if problem:
        parser.error(problem)
    if not args.out.endswith(".safetensors"):  # loaders tell a fastfair classifier file by this suffix
        stem, extension = os.path.splitext(args.out)
        weights = extension.lower() in (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
        fixed = (stem if weights else args.out) + ".safetensors"
        parser.error(f"--out {args.out}: a classifier file is written as safetensors; name it {fixed}")
    return args


def seeded(value: int) -> torch.Generator:
    """A CPU generator seeded with ``value`` folded into torch's 64-bit seeds (mod 2^64: a value torch takes keeps
    its stream, negative ones as two's complement; a larger one, e.g. derived from a date-like --seed, is no
    overflow)."""
    return torch.Generator().manual_seed(value % 2 ** 64)


def split_rows(count: int, fraction: float, seed: int):
    """(train rows, validation rows): a seeded random ``fraction`` of the rows held out (rows of distinct files:
    ``unique_rows``)."""
    order = torch.randperm(count, generator=seeded(seed)).tolist()
    held = int(round(count * fraction))
    return sorted(order[held:]), sorted(order[:held])


def split_groups(groups: Sequence[str], fraction: float, seed: int):
    """(train rows, validation rows) with every group's rows on one side: whole groups, in a seeded random order,
    are held out while that brings the held rows nearer round(count * fraction) (at least one group when that is
    > 0, however large)."""
    sizes = Counter(groups)
    names = sorted(sizes)
    target = int(round(len(groups) * fraction))
    held: Set[str] = set()
    count = 0
    order = [names[i] for i in torch.randperm(len(names), generator=seeded(seed)).tolist()]
    for name in order:
        if count + sizes[name] - target < target - count:  # nearer the target with this group than without
            held.add(name)
            count += sizes[name]
    if target and not held:
        held.add(min(order, key=sizes.__getitem__))
    return ([row for row, group in enumerate(groups) if group not in held],
            [row for row, group in enumerate(groups) if group in held])


def distinct_rows(table, head, labels, root: str) -> List[int]:
    rows = unique_rows(table, head, labels, root)
    if len(rows) < len(table):
        print(f"note: {table.source}: {len(table) - len(rows)} row(s) repeat an earlier row's image file and labels; "
              "each image is used once")
    return rows


def attribute_names(text: str) -> List[str]:
    """--attributes 'gender, race' -> ['gender', 'race'] (a name with a space kept was another column's)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or len(set(names)) < len(names):
        raise ValueError(f"--attributes {text!r}: expected distinct names separated by commas, e.g. gender,race,age")
    return names


def read_rows(path: str, flag: str):
    """The label table at ``path`` (given as ``flag``), refused when it lists no image."""
    table = read_label_table(path)
    if not len(table):
        raise ValueError(f"{flag} {path}: a header and no rows; list the images in it, a row each")
    return table


def prepare_data(args):
    table = read_rows(args.labels, "--labels")
    names = attribute_names(args.attributes)
    head, labels = resolve_labels(table, names)
    rows = distinct_rows(table, head, labels, args.data)
    if args.val_labels:
        val_table = read_rows(args.val_labels, "--val-labels")
        val_head, val_labels = resolve_labels(val_table, names)
        val_labels = align_labels(head, val_head, val_labels, f"--val-labels {args.val_labels}")
        val_rows = distinct_rows(val_table, head, val_labels, args.data)
        both = sorted({file_key(table.files[r], args.data) for r in rows}
                      & {file_key(val_table.files[r], args.data) for r in val_rows})
        if both:
            raise ValueError(f"--val-labels {args.val_labels}: {len(both)} image file(s) are also in --labels "
                             f"{args.labels}, e.g. {', '.join(both[:3])}; validating on training images overstates "
                             "accuracy: remove them from one table")
        if args.groups:
            groups = row_groups(args.groups, table, args.data)
            val_groups = row_groups(args.groups, val_table, args.data)
            shared = sorted({groups[r] for r in rows} & {val_groups[r] for r in val_rows})
            if shared:
                raise ValueError(f"--val-labels {args.val_labels}: {len(shared)} group(s) of --groups {args.groups} "
                                 f"have images in --labels {args.labels} too, e.g. {', '.join(shared[:3])}; "
                                 "validating on people trained on overstates accuracy: move them to one table")
        train = LabelledFaces(args.data, table, labels, rows, args.size)
        val = LabelledFaces(args.data, val_table, val_labels, val_rows, args.size)
    else:  # split by file (a file listed twice is in one split), or by group
        if args.groups:
            groups = row_groups(args.groups, table, args.data)
            train_at, val_at = split_groups([groups[r] for r in rows], args.val_fraction, args.seed)
            held = {groups[rows[i]] for i in val_at}
            print(f"--groups {args.groups}: {len(held)} of {len({groups[r] for r in rows})} groups held out for "
                  f"validation ({len(val_at)} of {len(rows)} rows)")
        else:
            train_at, val_at = split_rows(len(rows), args.val_fraction, args.seed)
        train = LabelledFaces(args.data, table, labels, [rows[i] for i in train_at], args.size)
        val = LabelledFaces(args.data, table, labels, [rows[i] for i in val_at], args.size)
    if len(train) == 0:
        whole = "; a group holding every row is held out whole: check --groups" if args.groups else ""
        held = "" if args.val_labels else (f" (--val-fraction {args.val_fraction} held out all {len(val)}: lower "
                                           f"it{whole})")
        raise ValueError(f"{args.labels}: no training rows{held}")
    trained = train.labels[train.indices]
    for a, attribute in enumerate(head.attributes):
        absent = [name for c, name in enumerate(attribute.classes) if not bool((trained[:, a] == c).any())]
        if absent:  # its output is never trained; with a split, its rows all fell into the validation part
            print(f"note: {attribute.name}: no training rows of class(es) {', '.join(absent)} ({len(train)} rows): "
                  "the classifier cannot learn them")
    if len(val):
        held = val.labels[val.indices]
        for a, attribute in enumerate(head.attributes):
            absent = [name for c, name in enumerate(attribute.classes)
                      if bool((trained[:, a] == c).any()) and not bool((held[:, a] == c).any())]
            if absent:  # balanced accuracy is over the classes present: a constant guess could score 1.0
                print(f"note: {attribute.name}: no validation rows of class(es) {', '.join(absent)} ({len(val)} "
                      "rows): the validation accuracy, which picks the saved epoch, does not measure them")
    for name, part in (("training", train), ("validation", val)):
        counts = part.labels[part.indices]
        print(f"{name} rows per class: " + "; ".join(
            f"{attribute.name} " + ", ".join(f"{cls} {int((counts[:, a] == c).sum())}"
                                             for c, cls in enumerate(attribute.classes))
            for a, attribute in enumerate(head.attributes)))
    missing = sorted(set(train.missing_files() + val.missing_files()))
    if missing:
        raise ValueError(f"--data {args.data}: {len(missing)} image file(s) named in the label table do not exist, "
                         f"e.g. {', '.join(missing[:3])}")
    check_images(train, val, args.workers, args.quiet)
    return head, train, val


class _ImageProblems(torch.utils.data.Dataset):
    def __init__(self, paths: List[str]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        return image_problem(self.paths[item])


def check_images(train: LabelledFaces, val: LabelledFaces, workers: int, quiet: bool = False) -> None:
    """Decode every listed image before training: a corrupt one ended the run at the first batch holding it (a
    validation image: after a whole epoch), and a resume met it again. ValueError naming them and the fix."""
    paths = train.paths() + val.paths()
    loader = DataLoader(_ImageProblems(paths), batch_size=64, num_workers=workers, collate_fn=list)
    problems = [problem for batch in tqdm(loader, desc="checking images", disable=quiet, unit="batch")
                for problem in batch]
    bad = [(k, problem) for k, problem in enumerate(problems) if problem is not None]
    if bad:
        k, problem = bad[0]
        part = "training" if k < len(train) else "validation"
        raise ValueError(f"{len(bad)} image file(s) in the label table cannot be decoded, e.g. {part} image "
                         f"{paths[k]} ({problem}); replace them with readable files or delete their rows")


def attribute_loss(head, logits, labels):
    return sum(F.cross_entropy(part, labels[:, a]) for a, part in enumerate(head.split(logits).values()))


@torch.no_grad()
def evaluate(classifier, dataset, batch_size, device, workers) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per-attribute (accuracy, balanced accuracy) on ``dataset``; balanced: the mean over the classes present of
    the share of that class's images predicted as it (sklearn's balanced_accuracy_score)."""
    classifier.eval()
    head = classifier.head
    right = [torch.zeros(len(a.classes)) for a in head.attributes]  # per class: images predicted right
    seen = [torch.zeros(len(a.classes)) for a in head.attributes]  # per class: images
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers, generator=torch.Generator()):
        for a, part in enumerate(head.split(classifier(images.to(device))).values()):
            truth, count = labels[:, a], len(head.attributes[a].classes)
            seen[a] += torch.bincount(truth, minlength=count)
            right[a] += torch.bincount(truth[part.argmax(-1).cpu() == truth], minlength=count)
    classifier.train()
    accuracy = {name: float(r.sum() / max(float(s.sum()), 1)) for name, r, s in zip(head.names, right, seen)}
    balanced = {name: float((r[s > 0] / s[s > 0]).mean()) if s.sum() else 0.0
                for name, r, s in zip(head.names, right, seen)}
    return accuracy, balanced


def state_path(out: str) -> str:
    return out + ".state.pt"


# the arguments a resume must repeat (--init is not: it is not read on a resume, and may be gone since)
RESUME_KEYS = ("data", "labels", "val_labels", "attributes", "arch", "width", "size", "batch_size", "epochs", "lr",
               "weight_decay", "no_flip", "seed", "val_fraction", "groups")
PATH_KEYS = ("data", "labels", "val_labels")  # compared as the files they name, not as typed


def _as_compared(key: str, value):
    # --groups names a file of groups or a column
    path = key in PATH_KEYS or (key == "groups" and bool(value) and os.path.isfile(value))
    return os.path.realpath(value) if path and value else value


def data_fingerprint(head, train_set, val_set) -> dict:
    """What the run trains on: the head, and each row's image file and labels (training rows, then validation
    rows), in order; kept in the state, as the --data/--labels paths say nothing of the files' contents."""
    labels = torch.cat([train_set.labels[train_set.indices], val_set.labels[val_set.indices]])
    return {"head": head.to_json(), "train": len(train_set),
            "files": [file_key(s.table.files[r]) for s in (train_set, val_set) for r in s.indices],
            "labels": labels.to(torch.uint8 if labels.numel() and labels.max() < 256 else torch.int32)}


def _examples(files: List[str]) -> str:
    return ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")


def _why(old, new) -> str:
    """Where fastfair's reading of class names changed since a state was saved: the tables need not have."""
    fractions = any("." in c for c in old.classes) and all(WHOLE_NUMBER.fullmatch(c) for c in old.classes)
    if len({class_key(c) for c in old.classes}) < len(old.classes):
        if fractions:
            return (" because fastfair now reads an integer written with a zero fraction ('1', '1.0') as one class "
                    "(2026-12-03): the tables need not have changed")
        return (" because fastfair now reads names that differ only by an integer's leading zeros ('07', '7') as "
                "one class (2026-11-30): the tables need not have changed")
    if fractions and sorted(old.classes, key=lambda c: int(class_key(c))) == list(new.classes):
        return (" because fastfair now sorts integers written with a zero fraction ('2.0', '10.0') by value "
                "(2026-12-03): the tables need not have changed; train afresh (another --out) for the new order")
    if sorted(old.classes, key=class_key) == list(new.classes):
        return (" because fastfair now sorts class names ignoring case (2026-12-02): the tables need not have "
                "changed; train afresh (another --out) for the new order")
    return ""


def fingerprint_changes(stored: dict, current: dict) -> List[str]:
    """How the data of ``current`` differ from ``stored`` (``data_fingerprint``s), in words; [] when they agree."""
    old_head, new_head = AttributeHead.from_json(stored["head"]), AttributeHead.from_json(current["head"])
    changes = [f"classes of {old.name} differ (then {list(old.classes)}, now {list(new.classes)})" + _why(old, new)
               for old, new in zip(old_head.attributes, new_head.attributes) if old.classes != new.classes]
    if (stored["files"] == current["files"] and stored["train"] == current["train"]
            and torch.equal(stored["labels"].long(), current["labels"].long())):
        return changes

    def rows(fingerprint, head):  # file -> (in the training split, class names)
        return {name: (i < fingerprint["train"], tuple(a.classes[c] for a, c in zip(head.attributes, row)))
                for i, (name, row) in enumerate(zip(fingerprint["files"], fingerprint["labels"].tolist()))}

    old, new = rows(stored, old_head), rows(current, new_head)
    removed, added = [f for f in old if f not in new], [f for f in new if f not in old]
    relabelled = [f for f in old if f in new and old[f][1] != new[f][1]]
    moved = [f for f in old if f in new and old[f][0] != new[f][0]]
    for files, what in ((removed, "row(s) removed"), (added, "row(s) added"),
                        (moved, "row(s) moved between the training and validation split")):
        if files:
            changes.append(f"{len(files)} {what} ({_examples(files)})")
    if relabelled:
        changes.append(f"labels of {len(relabelled)} row(s) differ ({_examples(relabelled)})")
    return changes or ["the rows are in another order"]


def save_state(path, args, classifier, optimizer, position, best, history, fingerprint):
    with atomic_path(path) as temporary:
        torch.save({"network": classifier.network.state_dict(), "optimizer": optimizer.state_dict(),
                    "position": position, "best": best, "history": history, "rng": torch.get_rng_state(),
                    # dropout on a GPU draws from the device's generator
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                    "config": {k: _as_compared(k, getattr(args, k)) for k in RESUME_KEYS},
                    "fingerprint": fingerprint}, temporary)


def load_state(path, args, fingerprint):
    """The training state at ``path``; refuses one made with other data or model arguments."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stored = state["config"]
    except Exception as error:  # cut short by a full disk, or another file saved under its name
        raise ValueError(f"--resume: {path} is not a training state this can read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); move it away to train from the start with this --out"
                         ) from None
    # keys a state from an older fastfair lacks are not compared
    changed = {k: stored[k] for k in RESUME_KEYS
               if k in stored and _as_compared(k, stored[k]) != _as_compared(k, getattr(args, k))}
    if changed:
        raise ValueError(f"--resume: {path} was made with {changed}; use the same arguments or another --out")
    if "fingerprint" not in state:
        print(f"note: {path} was saved by an older fastfair, which kept no record of the rows trained on: whether "
              "the label tables changed since is unknown")
    else:
        changes = fingerprint_changes(state["fingerprint"], fingerprint)
        if changes:
            raise ValueError(f"--resume: the data differ from those {path} was trained on: {'; '.join(changes)}; "
                             "train on changed data with a new --out (or restore the label tables)")
    return state


def initial_weights(classifier, path: str):
    """Load backbone weights, skipping tensors whose shape differs (the new head). Refuses a file that covers less
    than half of the network's weights (another architecture or --width: the run would start from scratch)."""
    try:
        state = load_state_dict(path)
    except ValueError as error:  # its message names the file and the problem; the flag is this one
        raise ValueError(f"--init {error}") from None
    own = classifier.network.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    covered = sum(own[k].numel() for k in kept if own[k].is_floating_point())
    total = sum(v.numel() for v in own.values() if v.is_floating_point())
    if covered < total / 2:
        example = next((f"{k}: {tuple(v.shape)} here {tuple(own[k].shape)}" for k, v in state.items()
                        if k in own and own[k].shape != v.shape), None)
        raise ValueError(f"--init {path}: its tensors match only {covered:,} of the {total:,} weights of the "
                         f"{classifier.arch} network" + (f" (e.g. {example})" if example else "")
                         + "; give a checkpoint of this --arch (and --width)")
    classifier.network.load_state_dict(kept, strict=False)
    skipped = [k for k in own if k not in kept]
    print(f"--init {path}: {len(kept)} of the network's {len(own)} tensors loaded"
          + (f", {len(skipped)} left as initialized (e.g. {skipped[0]}: another shape, or not in the file)"
             if skipped else ""))


def flip_some(images: torch.Tensor, seed: int, epoch: int, batch: int) -> torch.Tensor:
    """Mirror a seeded random half of the batch (seeded by position, so resuming repeats it)."""
    generator = seeded((seed * 1_000_003 + epoch) * 1_000_003 + batch)
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(images.device), images.flip(-1), images)


def epoch_batches(order: List[int], batch_size: int) -> List[List[int]]:
    """``order`` cut into batches of ``batch_size``; a last batch of one image joins the one before it (a batch
    of one cannot be normalized where BatchNorm sees 1x1 features: small ``--size``, deep stages), so every image
    still trains each epoch."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] += last
    return batches


def train(args) -> Optional[dict]:
    """Run (or resume) training; returns {"best": ..., "history": [...]} or None when stopped by --max-steps.
    ``best["mean"]``: the best epoch's mean balanced accuracy over attributes (what selects it)."""
    saved = state_path(args.out)
    if os.path.isfile(saved) and not args.resume:  # nothing saved is overwritten unasked
        raise ValueError(f"--out {args.out}: {saved} holds an earlier run's training state; pass --resume to "
                         "continue it, or use another --out (or delete it)")
    if os.path.exists(args.out) and not os.path.isfile(saved):  # a finished classifier whose state was deleted
        raise ValueError(f"--out {args.out}: the file exists and would be overwritten, and without its training "
                         f"state {saved} its run cannot be resumed; choose another --out (or delete it)")
    head, train_set, val_set = prepare_data(args)
    fingerprint = data_fingerprint(head, train_set, val_set)
    torch.manual_seed(args.seed % 2 ** 64)
    options = {"width": args.width} if args.arch == "small_cnn" else {}
    classifier = AttributeClassifier(head, args.arch, args.size, **options)
    resuming = args.resume and os.path.isfile(saved)
    if args.init and not resuming:  # a resumed run takes its weights from its state: --init may be gone since
        initial_weights(classifier, args.init)
    classifier.to(args.device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(epoch_batches(list(range(len(train_set))), args.batch_size))
    total_steps = steps_per_epoch * args.epochs
    position, best, history = {"epoch": 0, "batch": 0}, {"mean": -1.0}, []
    if resuming:
        state = load_state(saved, args, fingerprint)
        own = classifier.network.state_dict()
        other = [k for k, v in state["network"].items() if k in own and own[k].shape != v.shape]
        if other:  # a state without a fingerprint, of another head
            raise ValueError(f"--resume: {saved} holds a network of another shape ({other[-1]}: "
                             f"{tuple(state['network'][other[-1]].shape)}, here {tuple(own[other[-1]].shape)}): the "
                             f"classes ({head.describe()}) changed since; train with a new --out")
        classifier.network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        position, best, history = state["position"], state["best"], state["history"]
        if best["mean"] >= 0 and not os.path.isfile(args.out):  # the state keeps the latest weights, not the best
            raise ValueError(f"--resume: the classifier of the best epoch so far (epoch {best['epoch']}, mean balanced "
                             f"accuracy {best['mean']:.3f}), {args.out}, is gone and {saved} cannot restore it: put the "
                             "file back, or train anew (another --out, or delete the state)")
        if best["mean"] >= 0 and "balanced_accuracy" not in best:
            print(f"note: {saved} chose its best epoch so far by mean accuracy (an older fastfair); later epochs "
                  f"replace it when their mean balanced accuracy exceeds that ({best['mean']:.3f})")
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        reached = position["epoch"] * steps_per_epoch + position["batch"]
        if args.max_steps is not None and args.max_steps < reached:
            raise ValueError(f"--max-steps {args.max_steps}: the resumed run is already at step {reached}; raise it "
                             "to train on")
    print(f"classifier {args.arch} -> {head.describe()}: {len(train_set)} train / {len(val_set)} val images")
    for epoch in range(position["epoch"], args.epochs):
        order = torch.randperm(len(train_set), generator=seeded(args.seed * 100003 + epoch))
        first = position["batch"] if epoch == position["epoch"] else 0
        # a resumed run stopped at --max-steps: the epoch-end evaluation still pending runs, but no step
        if args.max_steps and epoch * steps_per_epoch + first >= args.max_steps and first < steps_per_epoch:
            print(f"already at step {args.max_steps} (--max-steps): nothing trained; raise it to train on")
            return None
        loader = DataLoader(train_set, batch_sampler=epoch_batches(order.tolist(), args.batch_size)[first:],
                            num_workers=args.workers, generator=torch.Generator())
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=first, total=steps_per_epoch,
                   disable=args.quiet)
        for batch, (images, labels) in enumerate(bar, start=first):
            step = epoch * steps_per_epoch + batch
            for group in optimizer.param_groups:  # cosine decay, a function of the step alone
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            images = images.to(args.device)
            if not args.no_flip:
                images = flip_some(images, args.seed, epoch, batch)
            loss = attribute_loss(head, classifier(images), labels.to(args.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            position = {"epoch": epoch, "batch": batch + 1}
            if (step + 1) % args.checkpoint_every == 0 or (args.max_steps and step + 1 >= args.max_steps):
                save_state(saved, args, classifier, optimizer, position, best, history, fingerprint)
            if args.max_steps and step + 1 >= args.max_steps:
                bar.update()  # tqdm counts a step when the next is asked for: this one is done
                bar.close()
                print(f"stopped after {step + 1} steps (--max-steps); continue with --resume and a higher or no "
                      "--max-steps")
                return None
        if not all(bool(torch.isfinite(p).all()) for p in classifier.parameters()):  # its scores would mean nothing
            kept = f"{args.out} keeps epoch {best['epoch']}, the best before" if best["mean"] >= 0 else "nothing saved"
            raise ValueError(f"epoch {epoch + 1}: the network's weights are no longer finite (training diverged): "
                             f"lower --lr (now {args.lr}) and start again; {kept}")
        position = {"epoch": epoch + 1, "batch": 0}
        accuracy, balanced = evaluate(classifier, val_set if len(val_set) else train_set, args.batch_size,
                                      args.device, args.workers)
        mean = sum(balanced.values()) / len(balanced)  # selects the best epoch (see the module docstring)
        history.append({"epoch": epoch + 1, "accuracy": accuracy, "balanced_accuracy": balanced})
        print(f"epoch {epoch + 1}: {'val' if len(val_set) else 'train'} accuracy (balanced) "
              + ", ".join(f"{name} {accuracy[name]:.3f} ({balanced[name]:.3f})" for name in accuracy))
        if mean > best["mean"]:
            best = {"mean": mean, "epoch": epoch + 1, "accuracy": accuracy, "balanced_accuracy": balanced}
            scored = "val" if len(val_set) else "train"  # without validation rows: the training rows' scores
            save_classifier(classifier, args.out, {f"{scored}_accuracy": json.dumps(accuracy),
                                                   f"{scored}_balanced_accuracy": json.dumps(balanced),
                                                   "epoch": str(epoch + 1), "seed": str(args.seed)})
        save_state(saved, args, classifier, optimizer, position, best, history, fingerprint)
    print(f"best epoch {best['epoch']} (mean balanced accuracy {best['mean']:.3f}) -> {args.out}")
    return {"best": best, "history": history}


def main(argv: Optional[List[str]] = None):
    return train(parse_args(argv))


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.classifiers.train",
                     "the same command with --resume continues from the last saved state"):
        main()
