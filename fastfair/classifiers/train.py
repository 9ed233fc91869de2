"""Train a face-attribute classifier on a labelled folder (FairFace- or CelebA-style).

    python -m fastfair.classifiers.train --data DIR --labels labels.csv --attributes gender,race,age \\
        --out clf.safetensors

Loss: the sum over attributes of the cross-entropy of that attribute's logits. After every epoch the
validation split (``--val-labels`` or a seeded ``--val-fraction`` of the rows) is scored per attribute;
the best mean accuracy is written to ``--out``. The full training state (weights, optimizer, RNG, data
position) goes atomically to ``OUT.state.pt`` every ``--checkpoint-every`` steps and at each epoch end;
``--resume`` continues from it exactly (same result as an uninterrupted run on the same machine).
Seed 0124: train the evaluation classifier separately (another ``--seed``, e.g. ``--arch small_cnn``).
"""
import argparse
import json
import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastfair.classifiers.data import LabelledFaces, read_label_table, resolve_labels
from fastfair.classifiers.model import ARCHITECTURES, AttributeClassifier, save_classifier
from fastfair.cli import folder_instead_of_file
from fastfair.faces.files import atomic_path, load_state_dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastfair.classifiers.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="image folder; file names in the label table are relative to it")
    parser.add_argument("--labels", required=True, help="label CSV (FairFace/CelebA columns) or list_attr_celeba.txt")
    parser.add_argument("--attributes", required=True, help="comma list: gender,race,age | celeba40 | column names")
    parser.add_argument("--out", required=True, help="classifier file to write (.safetensors)")
    parser.add_argument("--val-labels", help="separate validation table (same folder); default: a split")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of rows held out when no --val-labels")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mobilenet_v3_large")
    parser.add_argument("--width", type=int, default=16, help="small_cnn channel width")
    parser.add_argument("--init", help="initial network weights (torchvision layout, e.g. ImageNet); head skipped")
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
    parser.add_argument("--max-steps", type=int, help="stop (saving the state) after this many steps in total")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("epochs", "batch_size", "size", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps} (leave it out to train every epoch)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (this torch: {torch.__version__}); use cpu")
    problem = folder_instead_of_file("--out", args.out, "classifier", "gender.safetensors")
    if problem:
        parser.error(problem)
    return args


def split_rows(count: int, fraction: float, seed: int):
    """(train rows, validation rows): a seeded random ``fraction`` of the rows held out."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held = int(round(count * fraction))
    return sorted(order[held:]), sorted(order[:held])


def prepare_data(args):
    table = read_label_table(args.labels)
    head, labels = resolve_labels(table, args.attributes.split(","))
    if args.val_labels:
        val_table = read_label_table(args.val_labels)
        val_head, val_labels = resolve_labels(val_table, args.attributes.split(","))
        if val_head != head:
            raise ValueError(f"--val-labels classes {val_head.describe()} differ from --labels' {head.describe()}")
        train = LabelledFaces(args.data, table, labels, range(len(table)), args.size)
        val = LabelledFaces(args.data, val_table, val_labels, range(len(val_table)), args.size)
    else:
        train_rows, val_rows = split_rows(len(table), args.val_fraction, args.seed)
        train = LabelledFaces(args.data, table, labels, train_rows, args.size)
        val = LabelledFaces(args.data, table, labels, val_rows, args.size)
    if len(train) == 0:
        raise ValueError(f"{args.labels}: no training rows")
    missing = sorted(set(train.missing_files() + val.missing_files()))
    if missing:
        raise ValueError(f"--data {args.data}: {len(missing)} image file(s) named in the label table do not exist, "
                         f"e.g. {', '.join(missing[:3])}")
    return head, train, val


def attribute_loss(head, logits, labels):
    return sum(F.cross_entropy(part, labels[:, a]) for a, part in enumerate(head.split(logits).values()))


@torch.no_grad()
def evaluate(classifier, dataset, batch_size, device, workers) -> Dict[str, float]:
    """Per-attribute accuracy on ``dataset``."""
    classifier.eval()
    correct, total = torch.zeros(len(classifier.head.names)), 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers, generator=torch.Generator()):
        parts = classifier.head.split(classifier(images.to(device)))
        predicted = torch.stack([p.argmax(-1).cpu() for p in parts.values()], dim=1)
        correct += (predicted == labels).sum(0).float()
        total += labels.shape[0]
    classifier.train()
    return {name: float(c / max(total, 1)) for name, c in zip(classifier.head.names, correct)}


def state_path(out: str) -> str:
    return out + ".state.pt"


RESUME_KEYS = ("data", "labels", "val_labels", "attributes", "arch", "width", "init", "size", "batch_size", "epochs",
               "lr", "weight_decay", "no_flip", "seed", "val_fraction")


def save_state(path, args, classifier, optimizer, position, best, history):
    with atomic_path(path) as temporary:
        torch.save({"network": classifier.network.state_dict(), "optimizer": optimizer.state_dict(),
                    "position": position, "best": best, "history": history, "rng": torch.get_rng_state(),
                    # dropout on a GPU draws from the device's generator
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                    "config": {k: getattr(args, k) for k in RESUME_KEYS}}, temporary)


def load_state(path, args):
    """The training state at ``path``; refuses one made with other data or model arguments."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    stored = state["config"]
    # keys a state from an older fastfair lacks are not compared
    changed = {k: stored[k] for k in RESUME_KEYS if k in stored and stored[k] != getattr(args, k)}
    if changed:
        raise ValueError(f"--resume: {path} was made with {changed}; use the same arguments or another --out")
    return state


def initial_weights(classifier, path: str):
    """Load backbone weights, skipping tensors whose shape differs (the new head)."""
    state = load_state_dict(path)
    own = classifier.network.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not kept:
        raise ValueError(f"--init {path}: no tensor matches the {classifier.arch} layout")
    classifier.network.load_state_dict(kept, strict=False)


def flip_some(images: torch.Tensor, seed: int, epoch: int, batch: int) -> torch.Tensor:
    """Mirror a seeded random half of the batch (seeded by position, so resuming repeats it)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(images.device), images.flip(-1), images)


def train(args) -> Optional[dict]:
    """Run (or resume) training; returns {"best": ..., "history": [...]} or None when stopped by --max-steps."""
    head, train_set, val_set = prepare_data(args)
    torch.manual_seed(args.seed)
    options = {"width": args.width} if args.arch == "small_cnn" else {}
    classifier = AttributeClassifier(head, args.arch, args.size, **options)
    if args.init:
        initial_weights(classifier, args.init)
    classifier.to(args.device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    position, best, history = {"epoch": 0, "batch": 0}, {"mean": -1.0}, []
    if os.path.isfile(state_path(args.out)) and not args.resume:  # nothing saved is overwritten unasked
        raise ValueError(f"--out {args.out}: {state_path(args.out)} holds an earlier run's training state; pass "
                         "--resume to continue it, or use another --out (or delete it)")
    if args.resume and os.path.isfile(state_path(args.out)):
        state = load_state(state_path(args.out), args)
        classifier.network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        position, best, history = state["position"], state["best"], state["history"]
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        reached = position["epoch"] * steps_per_epoch + position["batch"]
        if args.max_steps is not None and args.max_steps < reached:
            raise ValueError(f"--max-steps {args.max_steps}: the resumed run is already at step {reached}; raise it "
                             "to train on")
    print(f"classifier {args.arch} -> {head.describe()}: {len(train_set)} train / {len(val_set)} val images")
    for epoch in range(position["epoch"], args.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        first = position["batch"] if epoch == position["epoch"] else 0
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order[first * args.batch_size:].tolist(),
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
                save_state(state_path(args.out), args, classifier, optimizer, position, best, history)
            if args.max_steps and step + 1 >= args.max_steps:
                print(f"stopped after {step + 1} steps (--max-steps); continue with --resume")
                return None
        position = {"epoch": epoch + 1, "batch": 0}
        accuracy = evaluate(classifier, val_set if len(val_set) else train_set, args.batch_size, args.device,
                            args.workers)
        mean = sum(accuracy.values()) / len(accuracy)
        history.append({"epoch": epoch + 1, "accuracy": accuracy})
        print(f"epoch {epoch + 1}: {'val' if len(val_set) else 'train'} accuracy "
              + ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items()))
        if mean > best["mean"]:
            best = {"mean": mean, "epoch": epoch + 1, "accuracy": accuracy}
            save_classifier(classifier, args.out, {"val_accuracy": json.dumps(accuracy), "epoch": str(epoch + 1),
                                                   "seed": str(args.seed)})
        save_state(state_path(args.out), args, classifier, optimizer, position, best, history)
    print(f"best epoch {best['epoch']} (mean accuracy {best['mean']:.3f}) -> {args.out}")
    return {"best": best, "history": history}


def main(argv: Optional[List[str]] = None):
    return train(parse_args(argv))


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.classifiers.train"):
        main()
