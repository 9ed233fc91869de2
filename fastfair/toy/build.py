"""Build the toy world's weights: ``python -m fastfair.toy.build [--quick] [--out DIR]``.

Stages (fixed seeds, one thread, deterministic kernels): tokenizer -> text encoder (pretrained, then
frozen) -> autoencoder -> U-Net -> diffusers folder ``DIR/pipeline`` -> classifiers ``train`` and
``eval`` -> face detector -> face bank -> checksum -> a measurement of the model's skew on the
held-out occupations (eval classifier). Writes ``DIR/build.json`` (settings, timings, per-file
sha256, the combined checksum, measurements) and prints the checksum: on the same machine and
library versions, a full build reproduces the shipped weights' checksum bit for bit.
``--quick`` runs every stage for a few steps (seconds; the tests use it): a working, untrained set.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fastfair.cli import file_instead_of_folder
from fastfair.files import write_text
from fastfair.toy.measure import TOY_GUIDANCE_SCALE

FULL = dict(text_steps=300, vae_steps=2000, vae_batch=16, pool_size=16384, unet_steps=3000, unet_batch=64,
            classifier_steps=400, classifier_batch=64, detector_steps=400, detector_batch=64, bank_size=1024,
            check_images=512, report_prompts=10, report_images=32)
QUICK = dict(text_steps=10, vae_steps=10, vae_batch=4, pool_size=64, unet_steps=10, unet_batch=8,
             classifier_steps=10, classifier_batch=16, detector_steps=10, detector_batch=16, bank_size=32,
             check_images=16, report_prompts=2, report_images=2)
SEED = 0
REPORT_GUIDANCE = (TOY_GUIDANCE_SCALE, 7.5)  # the toy's recommended scale and SD's default


class Stages:
    """Times each stage (wall and CPU seconds) and prints a line per stage."""

    def __init__(self):
        self.timings: Dict[str, Dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        print(f"[toy build] {name} ...", flush=True)
        yield
        self.timings[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                              "cpu_s": round(time.process_time() - cpu, 1)}
        print(f"[toy build] {name}: {self.timings[name]['wall_s']} s", flush=True)


# in --out while a build runs (a build stopped halfway leaves it, so a rerun may replace what it wrote)
UNFINISHED_MARKER = ".fastfair_toy_build_unfinished"


def foreign_files(out: str) -> List[str]:
    """The files and folders a build writes that ``out`` already holds though no build made them (it holds neither
    a build record nor an unfinished build's marker): a build would replace them, e.g. someone's own pipeline/."""
    from fastfair.toy import files

    folder = Path(out)
    try:
        record = json.loads((folder / files.BUILD_RECORD).read_text(encoding="utf-8"))
        ours = isinstance(record, dict) and {"checksum", "files"} <= set(record)
    except (OSError, ValueError):
        ours = False
    if ours or (folder / UNFINISHED_MARKER).exists():
        return []
    return [name for name in [files.PIPELINE] + files.built_names() if (folder / name).exists()]


def refuse_foreign_files(out: str) -> None:
    """ValueError naming ``foreign_files(out)``, if any."""
    foreign = foreign_files(out)
    if foreign:
        raise ValueError(f"--out {out} holds {', '.join(foreign)}, which no toy build wrote and a build would "
                         "replace: give another --out, or move them away")


def build(out: str, quick: bool = False) -> Dict:
    """Run every stage into ``out``; returns the build record (also written to ``out/build.json``)."""
    from fastfair.toy import files, models
    from fastfair.toy.autoencoder import train_autoencoder
    from fastfair.toy.captions import CONCEPTS, prompts
    from fastfair.toy.classifiers import (KINDS, accuracy, heldout_crops, save_toy_classifier,
                                          train_toy_classifier)
    from fastfair.toy.detector import detection_rate, face_free_images, save_toy_detector, train_toy_detector
    from fastfair.toy.diffusion import train_unet
    from fastfair.toy.face_bank import build_face_bank, save_face_bank
    from fastfair.toy.measure import measure_prompts
    from fastfair.toy.text_encoder import pretrain_text_encoder
    from fastfair.toy.tokenizer import build_tokenizer
    from fastfair.toy.training import BUILD_THREADS, make_deterministic
    from fastfair.toy.world import draw_random_portraits

    make_deterministic()
    settings = QUICK if quick else FULL
    stages, checks = Stages(), {}
    started, load_before = time.perf_counter(), os.getloadavg()
    refuse_foreign_files(out)
    os.makedirs(out, exist_ok=True)
    Path(out, UNFINISHED_MARKER).touch()
    with stages.stage("text encoder"):
        tokenizer = build_tokenizer([c.prompt for c in CONCEPTS])
        text_encoder = pretrain_text_encoder(tokenizer, settings["text_steps"], SEED)
    with stages.stage("autoencoder"):
        vae = train_autoencoder(settings["vae_steps"], settings["vae_batch"], SEED + 1, settings["check_images"])
    with stages.stage("U-Net"):
        unet = train_unet(vae, text_encoder, tokenizer, settings["unet_steps"], settings["unet_batch"],
                          settings["pool_size"], SEED + 2)
    pipeline = models.assemble_pipeline(vae, text_encoder, tokenizer, unet)
    # written beside, then put in place: an earlier build's pipeline stays whole until the new one is
    pipeline_dir, partial = os.path.join(out, files.PIPELINE), os.path.join(out, f".{files.PIPELINE}-partial")
    shutil.rmtree(partial, ignore_errors=True)
    models.save_pipeline(pipeline, partial)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    os.replace(partial, pipeline_dir)
    check_count = settings["check_images"]
    check_images = draw_random_portraits(check_count, 10_000_019)
    classifiers = {}
    for kind in KINDS:
        with stages.stage(f"{kind} classifier"):
            classifiers[kind] = train_toy_classifier(kind, settings["classifier_steps"], settings["classifier_batch"],
                                                     SEED + 3)
            checks[f"{kind}_classifier_accuracy"] = accuracy(classifiers[kind], *heldout_crops(check_count, 10_000_079))
            save_toy_classifier(classifiers[kind], kind, out, {"accuracy_on_fresh_crops": checks[
                f"{kind}_classifier_accuracy"]})
    with stages.stage("face detector"):
        detector = train_toy_detector(settings["detector_steps"], settings["detector_batch"], SEED + 4)
        checks["detector_rate_on_portraits"] = detection_rate(detector, check_images.images, check_images.boxes)
        noise = face_free_images(check_count, torch.Generator().manual_seed(10_000_103))
        checks["detector_false_positives_on_face_free"] = sum(bool(d) for d in detector(noise)) / len(noise)
        save_toy_detector(detector, out, {"rate_on_portraits": checks["detector_rate_on_portraits"]})
    with stages.stage("face bank"):
        bank = build_face_bank(settings["bank_size"], SEED + 5)
        save_face_bank(bank, out, {"source": f"draw_random_portraits({settings['bank_size']}, seed={SEED + 5})"})
    files.make_world_readable(out)
    sums = files.weight_checksums(out)
    checksum = files.combined_checksum(sums)
    build_wall = round(time.perf_counter() - started, 1)
    with stages.stage("skew report"):
        pipeline.set_progress_bar_config(disable=True)
        heldout = prompts("heldout", "occupation")[: settings["report_prompts"]]
        skew = {f"guidance_{scale}": summarize_skew(measure_prompts(
            pipeline, heldout, detector, classifiers["eval"], settings["report_images"], 20_000, scale))
            for scale in REPORT_GUIDANCE}
    record = {
        "checksum": checksum, "files": sums, "quick": quick, "settings": settings, "seed": SEED,
        "build_wall_s": build_wall, "stages": stages.timings, "threads": BUILD_THREADS,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "versions": versions(), "checks": checks, "heldout_skew": skew,
    }
    write_text(os.path.join(out, files.BUILD_RECORD), json.dumps(record, indent=2))
    os.remove(os.path.join(out, UNFINISHED_MARKER))
    return record


def versions() -> Dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "machine": platform.machine()}


def summarize_skew(report: Dict[str, Dict]) -> Dict:
    """Per held-out occupation: the data's and the generated female share (None where no face was found); and the
    mean gender bias of both over the prompts with faces (None if none had any)."""
    from fastfair.toy.captions import concepts

    data = {c.prompt: c.probabilities["gender"][0] for c in concepts("heldout", "occupation")}
    found = [prompt for prompt, result in report.items() if result["faces_found"]]
    rows = {prompt: {"data_female": round(data[prompt], 3),
                     "generated_female": round(result["gender"]["frequencies"][0], 3) if prompt in found else None,
                     "faces_found": result["faces_found"]} for prompt, result in report.items()}

    def mean(values):  # an empty mean would read as a fair 0.0
        return round(sum(values) / len(values), 3) if values else None
    return {"per_prompt": rows, "prompts_with_faces": len(found),
            "mean_gender_bias_generated": mean([report[prompt]["gender"]["bias"] for prompt in found]),
            "mean_gender_bias_data": mean([abs(2 * data[prompt] - 1) for prompt in found])}


def parse_args(argv: Optional[List[str]] = None):
    from fastfair.toy.files import WEIGHTS_DIR

    parser = argparse.ArgumentParser(prog="python -m fastfair.toy.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (seconds): for tests")
    parser.add_argument("--out", default=None, help="output folder (default: the package's weights, which a full "
                        "build replaces; --quick needs another folder)")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.strip():  # "" (an empty shell variable) would mean the shipped weights
        parser.error(f"--out {args.out!r}: empty; give a folder, or leave --out out to rebuild the shipped weights")
    args.out = args.out or str(WEIGHTS_DIR)
    if args.quick and Path(args.out).resolve() == Path(WEIGHTS_DIR).resolve():
        # its barely trained models would replace the shipped ones the demo and configs use
        parser.error(f"--quick writes barely trained models: give --out DIR, not the package's weights ({args.out})")
    problem = file_instead_of_folder("--out", args.out, "the toy world's files")
    if problem:
        parser.error(problem)
    try:
        refuse_foreign_files(args.out)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    record = build(args.out, args.quick)
    print(f"[toy build] wrote {args.out} in {record['build_wall_s']} s (+ report)")
    for name, skew in record["heldout_skew"].items():
        print(f"[toy build] held-out occupations, {name}: " + (
            f"mean gender bias of the data {skew['mean_gender_bias_data']}, of the generated images "
            f"{skew['mean_gender_bias_generated']} ({skew['prompts_with_faces']} prompts with faces)"
            if skew["prompts_with_faces"] else "no face found in the generated images"))
    print(f"checksum: {record['checksum']}")


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.toy.build"):
        sys.exit(main())
