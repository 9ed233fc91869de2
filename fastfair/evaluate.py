"""Evaluate a base model and a finetuned one: ``python -m fastfair.evaluate --model SD_DIR|toy|SD_FILE
[--model-config SD_DIR (with SD_FILE)] [--finetuned CKPT_OR_EXPORT] --classifier CLF.safetensors
--prompts occupations:test --out DIR``.

Steps (seed 0124-0135): generate `--images-per-prompt` images per prompt with both models from paired noise
(default: each attribute set's bias over the seed's 60 / 80 / 160 images for 2 / 4 / 8 classes, the first of the
largest count generated; ``scoring.images_per_set``) into a resumable PNG cache (`fastfair.evaluation.cache`);
classify each image's largest face and score CLIP-T, CLIP-I, DINO (`fastfair.evaluation.scoring`) and,
optionally, FID (`fastfair.evaluation.fid`); per-prompt metrics and their mean ± std over prompts
(`fastfair.metrics`), for each `--guidance-scales` value; then metrics.json, per_prompt.csv, summary.md, the
Fig. 9 plots, image grids and report.html (`fastfair.evaluation.report`).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from fastfair.checkpoint import config_file
from fastfair.cli import device_problem, file_instead_of_folder
from fastfair.config import FACE_MARGIN, SINGLE_FILE_CONFIG_LAYOUT
from fastfair.dft import schedule_for
from fastfair.evaluation.cache import (MANIFEST, ImageCache, Job, StaleCacheError, from_png, generate_missing,
                                       image_path, shared_cache_lock, weight_fingerprint)
from fastfair.evaluation.report import write_report
from fastfair.evaluation.scoring import Scorer, attribute_sets, images_per_set, load_classifiers
from fastfair.evaluation.shared import SharedLoads
from fastfair.evaluation.sources import (MODEL_REGISTRY, finetuned_kind, load_sources, resolve_model,
                                        resolve_model_config)
from fastfair.faces import get_detector
from fastfair.faces.detect import detector_from_flags  # shared with python -m fastfair.faces.build_bank
from fastfair.metrics import summarize
from fastfair.models import latent_size, sampling_configs, vae_factor
from fastfair.prompts import SPLITS, list_prompt_sets, load_prompt_file, load_prompt_set


SEMANTICS_CALL = "factory(settings) -> a fastfair SemanticsLoss"  # --semantics's contract, for the messages


def load_prompts(spec: str, max_prompts: Optional[int] = None) -> list:
    """'name:split' of a shipped set (split defaults to test), a text file of full prompts, used as written (no
    template: a file of bare items, as a training data.sets.occupations.file holds, would be evaluated as 'nurse'),
    or 'package.module:function[:split]', a prompt-set factory as a training config's data.sets.<n>.factory names
    one, called with the split (default test; e.g. fastfair.toy:occupation_prompts); first N."""
    from fastfair.hooks import load_callable
    from fastfair.prompts import factory_prompts

    name, _, split = spec.partition(":")
    expected = (f"not a file, not a shipped set (NAME[:SPLIT] with NAME in {list_prompt_sets()}, SPLIT in "
                f"{SPLITS}) and not a prompt-set factory (package.module:function[:SPLIT])")
    if name in list_prompt_sets():
        if Path(spec).is_file():  # the set would be read, the file beside it not
            raise ValueError(f"--prompts {spec}: both a shipped prompt set and a file here; give ./{spec} for the "
                             f"file, or {name}:{split or 'test'} for the set")
        if (split or "test") not in SPLITS:
            raise ValueError(f"--prompts {spec}: the shipped set {name} has the splits {', '.join(SPLITS)}, not "
                             f"{split!r}")
        prompts = load_prompt_set(name, split or "test")
    elif Path(spec).is_file():
        prompts = load_prompt_file(spec)
    elif split:  # package.module:function[:split]
        function, _, split = split.partition(":")
        try:
            factory = load_callable(f"{name}:{function}", "--prompts")
        except ValueError as error:
            raise ValueError(f"--prompts {spec}: {expected}: {error}") from None
        try:
            returned = factory(split or "test")
        except (TypeError, ValueError) as error:  # its signature, or a split it does not have
            raise ValueError(f"--prompts {spec}: {name}:{function}({split or 'test'!r}) failed: "
                             f"{type(error).__name__}: {error}") from error
        prompts = factory_prompts(returned, f"--prompts {spec}")
    else:
        raise ValueError(f"--prompts {spec}: {expected}")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"--max-prompts {max_prompts}: expected at least 1")
    if not prompts:
        raise ValueError(f"--prompts {spec}: holds no prompt")
    return prompts[:max_prompts]


def evaluate(model: str, classifiers: Sequence[str], prompts: Sequence[str], out, finetuned: Optional[str] = None,
             attributes: Optional[Sequence[str]] = None, targets: Optional[Dict[str, Sequence[float]]] = None,
             joint: Optional[Sequence] = None, images_per_prompt: Optional[int] = None,
             guidance_scales: Sequence[float] = (7.5,), num_steps: int = 20, seed: int = 0, batch_size: int = 8,
             detector="opencv", margin: float = FACE_MARGIN, clip=None, dino=None, dtype: str = "fp32",
             weights: str = "ema", device: Optional[str] = None, grid_columns: int = 8,
             fid_reference=None, fid_inception=None, progress: bool = True, semantics=None,
             model_config: Optional[str] = None, classifier_head: Optional[Sequence[str]] = None,
             base_images=None, shared: Optional[SharedLoads] = None, resolution: Optional[int] = None) -> dict:
    """Run the whole evaluation (module docstring); returns the results dict (also in metrics.json) with
    ``generated``: the cache paths this call had to generate. semantics: a `fastfair.losses.SemanticsLoss` or a
    'package.module:function' returning one (e.g. ``fastfair.toy:toy_semantics``), scored as ``sim_<encoder>``.
    model_config: the architecture folder (a diffusers folder) when model is a single-file checkpoint. joint: the
    intersections scored besides each attribute (`fastfair.evaluation.scoring.attribute_sets`; None: that of all
    the attributes). base_images: a folder caching the base model's images apart from `out`, so that evaluations
    of several finetuned models (a run's checkpoints: `fastfair.select_checkpoint`) generate them once; its
    manifest holds the base model's settings only (None: they are cached with the finetuned ones in out/images).
    shared: the models and base-image measurements held between evaluations of one process (a sweep's; they are
    made again when the settings differ, `fastfair.evaluation.shared`); None: this call's own."""
    device = evaluation_device(device)
    shared = shared if shared is not None else SharedLoads()
    _check_arguments(classifiers, prompts, out, images_per_prompt, guidance_scales, num_steps, batch_size, margin,
                     grid_columns, fid_reference, fid_inception, base_images, seed, finetuned)
    detector_name = _detector_name(detector)
    detector_spec = detector
    # before any image is made: an unknown name or a missing model pack fails now
    detector = shared.get("detector", detector_spec, lambda: get_detector(detector_spec))
    judges, classes, sets = evaluated_sets(classifiers, attributes, targets, joint, device, classifier_head, shared)
    counts = images_per_set(sets, images_per_prompt)
    count = max(counts.values())  # generated per prompt; each set scores its first counts[set]
    _check_judge_inputs(clip, dino, semantics, fid_reference, fid_inception, count * len(prompts))

    model_config = resolve_model_config(model_config)  # the fingerprint below reads its files
    resolution = resolution if resolution is not None else trained_resolution(finetuned, model)

    def check_sampling(scheduler, scale):
        try:  # the schedule the sampler will use: refused here by its flag, not at the first batch by its key
            schedule_for(scheduler, num_steps)
        except ValueError as error:
            said = str(error).removeprefix(f"num_steps={num_steps}: ")
            raise ValueError(f"--steps {num_steps}: {said}") from None
        if resolution is not None and (resolution < 1 or resolution % scale):  # decoded images of another size
            raise ValueError(f"--resolution {resolution}: expected an image side in pixels, a multiple of the VAE's "
                             f"factor {scale}")

    configs = sampling_configs(resolve_model(model), model_config)
    if configs is not None:  # from the config files: refused before the models load
        check_sampling(configs.scheduler, configs.vae_factor)
    vae, scheduler, sources = load_sources(model, finetuned, dtype, device, weights, model_config, shared)
    scale = vae_factor(vae.config.block_out_channels)
    if configs is None:
        check_sampling(scheduler, scale)
    unet_config = sources["base"].unet.config
    # the side the run sampled at (model.resolution), as it trained; else the U-Net's own size
    height, width = (resolution // scale,) * 2 if resolution else latent_size(unet_config)
    latent_shape = (unet_config.in_channels, height, width)
    # a square model's images are keyed by their side, as before pairs were read: existing caches stay valid
    resolution = height * scale if height == width else [height * scale, width * scale]
    base_settings = _base_settings(model, model_config, num_steps, seed, dtype, resolution)
    reads = checkpoint_reads(finetuned)
    settings = {**base_settings, **_finetuned_settings(finetuned, weights, reads)}
    run_config = config_file(finetuned) if reads is not None else None
    if run_config is not None and Path(finetuned) not in run_config.parents:
        # an older checkpoint reads its settings (LoRA alpha, ...) from the run's config.yaml, which a resume rewrites
        settings["finetuned_run_config"] = weight_fingerprint(run_config)
    if run_config is not None and run_config.is_file():
        _warn_of_training_prompts(run_config, prompts)
    out = Path(out)

    def generate(m):
        jobs = [Job(image_path(g, m, p, j), m, float(g), p, prompt, j) for g in guidance_scales
                for p, prompt in enumerate(prompts) for j in range(count)]
        if m == "base" and base_images is not None:
            _refuse_other_prompts(caches[m], prompts)
        generate_missing(caches[m], jobs, sources, vae, scheduler, latent_shape, num_steps, batch_size, device,
                         progress)

    # each cache read and filled under its folder's lock: two evaluations of one folder (sweep shards listing a
    # checkpoint both) take turns, the second finding the images cached
    with shared_cache_lock(out / "images"):
        cache = ImageCache(out / "images", settings, as_recorded_now=_as_recorded_now(reads))
        caches = {m: cache for m in sources}
        if base_images is not None:
            with shared_cache_lock(base_images):  # evaluations sharing the folder generate its images once
                caches["base"] = ImageCache(base_images, base_settings, "--base-images",
                                            as_recorded_now=_canonical_paths)
                generate("base")
            settings["base_images"] = str(base_images)  # reported; the base images' own check is their manifest's
        for m in caches:
            if caches[m] is cache:  # the base images in a base-images folder were generated under its lock above
                generate(m)

    # what the scores depend on besides the images (the classifiers and detector are held apart, above); the
    # files' fingerprints too, so that weights rewritten under the same path are read again
    scorer_settings = (judges, detector, margin, clip, dino, device, semantics, fid_reference, fid_inception,
                       [weight_fingerprint(path) for path in (clip, dino, fid_inception)])
    scorer, fid = shared.get("scorer", scorer_settings, lambda: _scorer(judges, detector, margin, clip, dino, device,
                                                                       semantics, fid_reference, fid_inception))
    # a base-images folder's images are the same for every evaluation of the sweep: measured once
    base_measured = None if base_images is None else shared.get(
        "base measurements", (scorer_settings, str(caches["base"].root), base_settings, count), dict)
    results = {"settings": {**settings, "images_per_prompt": count, "images_per_set": counts,
                            "guidance_scales": list(guidance_scales),
                            "classifiers": [str(c) for c in classifiers],
                            "detector": detector_name,
                            "semantic_encoders": list(scorer.encoders),
                            "diversity_encoder": scorer.diversity_encoder},
               "prompts": list(prompts), "guidance": {},
               "attribute_sets": [{"name": s.name, "attributes": list(s.attributes), "classes": list(s.classes),
                                   "target": list(s.target)} for s in sets]}
    class_counts = {k: len(v) for k, v in classes.items()}
    for g in guidance_scales:
        results["guidance"][f"{g:g}"] = _score_guidance(g, prompts, caches, count, scorer, sets, class_counts,
                                                        counts, fid, base_measured)
    write_report(results, out, {m: model_cache.root for m, model_cache in caches.items()}, grid_columns)
    generated = {path for model_cache in set(caches.values()) for path in model_cache.generated}
    return {**results, "generated": sorted(generated)}


def trained_resolution(finetuned, model: Optional[str] = None) -> Optional[int]:
    """The image side a finetuned model's run sampled at (its model.resolution: an export records it, a training
    checkpoint's settings hold it; without a finetuned model, a model written by ``export --merged`` records its
    own); None where it used the model's own size, or nothing says."""
    from fastfair.checkpoint import trained_settings
    from fastfair.export import export_info

    if not finetuned:
        folder = resolve_model(model) if model else None
        return export_info(folder).get("resolution") if folder and Path(folder).is_dir() else None
    if finetuned_kind(finetuned) == "export":
        return export_info(finetuned).get("resolution")
    return ((trained_settings(finetuned) or {}).get("model") or {}).get("resolution")


def evaluation_device(device: Optional[str] = None) -> str:
    """The device an evaluation runs on: the one given, else CUDA where there is one, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def evaluated_sets(classifiers, attributes=None, targets=None, joint=None, device="cpu", classifier_head=None,
                   shared: Optional[SharedLoads] = None):
    """(judges, classes, attribute sets) an evaluation scores: each attribute, then the intersections `joint`
    names (None: that of all the attributes, when there are two or more). shared: where the loaded classifiers
    are held between calls with the same arguments."""
    def load():
        judges, classes = load_classifiers(classifiers, attributes, device, classifier_head)
        intersections = (list(classes) if len(classes) >= 2 else []) if joint is None else joint
        return judges, classes, attribute_sets(classes, targets or {}, intersections)

    settings = ([str(c) for c in classifiers], [weight_fingerprint(c) for c in classifiers], attributes, targets,
                joint, str(device), classifier_head)
    return (shared or SharedLoads()).get("classifiers", settings, load)


def _scorer(judges, detector, margin, clip, dino, device, semantics, fid_reference, fid_inception):
    """(Scorer, FID extractor or None): the judges of the images, loaded."""
    if isinstance(semantics, str):
        from fastfair.hooks import load_callable

        spec, semantics = semantics, load_callable(semantics, "--semantics")(None)
        if not callable(getattr(getattr(semantics, "encoders", None), "items", None)):  # the scorer embeds with each
            raise ValueError(f"--semantics {spec!r} returned a {type(semantics).__name__}: expected {SEMANTICS_CALL} "
                             "(its .encoders {name: module} embed the images)")
    scorer = Scorer(judges, detector, margin, clip, dino, device, semantics=semantics)
    return scorer, _fid_scorer(fid_reference, fid_inception, device) if fid_reference else None


def _check_arguments(classifiers, prompts, out, images_per_prompt, guidance_scales, num_steps, batch_size, margin,
                     grid_columns, fid_reference, fid_inception, base_images=None, seed: int = 0,
                     finetuned=None) -> None:
    """evaluate's arguments, refused before any model loads or image is made (named by their CLI flags)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    from fastfair.export import refuse_prefix_token

    refuse_prefix_token(prompts, "--prompts: the prompt")
    repeated = sorted((prompt, n) for prompt, n in Counter(prompts).items() if n > 1)
    if repeated:  # results are keyed by the prompt: a repeat would be one row, counted twice in the summary
        raise ValueError(f"prompts: {repeated[0][0]!r} is given {repeated[0][1]} times; give each prompt once (more "
                         "images of it: --images-per-prompt)")
    if not classifiers:
        raise ValueError("--classifier: give at least one attribute classifier file")
    # folders and results are keyed by the scale as printed: 7.5 and 7.5000001 would share them
    if not guidance_scales or len({f"{float(g):g}" for g in guidance_scales}) != len(guidance_scales):
        raise ValueError(f"--guidance-scales {list(guidance_scales)}: expected one or more distinct scales (as "
                         "printed with 6 significant digits)")
    if not all(math.isfinite(float(g)) for g in guidance_scales):
        raise ValueError(f"--guidance-scales {list(guidance_scales)}: expected finite numbers")
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"--steps {num_steps} and --batch-size {batch_size} must be >= 1")
    if seed < 0:  # the paired noise's seeds are derived from it by numpy, which takes no negative seed
        raise ValueError(f"--seed {seed}: expected an integer >= 0")
    if grid_columns < 1:
        raise ValueError(f"--grid-columns {grid_columns}: expected at least 1")
    if not (math.isfinite(margin) and margin >= 0):  # an infinite crop box around every face
        raise ValueError(f"--margin {margin}: expected a finite fraction of the face box >= 0 (default "
                         f"{FACE_MARGIN})")
    problem = file_instead_of_folder("--out", out, "the images and the report") or (
        base_images is not None and file_instead_of_folder("--base-images", base_images, "the base model's images"))
    if problem:
        raise ValueError(problem)
    # an earlier report whose image cache (which would refuse other settings) is gone, or a training run's folder
    # (its images/ holds the training samples): the report and images would be replaced or mixed in, unsaid
    keeps_images = finetuned is not None or base_images is None  # a base-only run with --base-images keeps none
    if keeps_images and (Path(out) / "metrics.json").is_file() and not (Path(out) / "images" / MANIFEST).is_file():
        raise ValueError(f"--out {out}: holds the report of an earlier evaluation (metrics.json) whose images are "
                         "gone, which this one would replace; give another --out, or move or delete that report")
    if (Path(out) / "checkpoints").is_dir():
        raise ValueError(f"--out {out}: a training run's folder (it holds checkpoints/); give the evaluation a "
                         f"folder of its own, e.g. {Path(out) / 'eval'}")
    if base_images is not None and Path(base_images).resolve() == (Path(out) / "images").resolve():
        raise ValueError(f"--base-images {base_images}: the folder --out keeps the finetuned model's images in; "
                         "give a folder of its own (e.g. beside --out)")
    for flag, folder in (("--out", out), ("--base-images", base_images)):
        # the report written into the finetuned folder would change its fingerprint: every rerun refused
        if finetuned and folder is not None and _at_or_below(Path(folder), Path(finetuned)):
            raise ValueError(f"{flag} {folder}: inside --finetuned {finetuned}, whose files the images are keyed by; "
                             "give a folder of its own (e.g. beside it)")
    if bool(fid_reference) != bool(fid_inception):
        raise ValueError("FID needs both --fid-reference (a folder of real images) and --fid-inception (weights)")
    if images_per_prompt is not None and images_per_prompt < 1:  # only None means the default count
        raise ValueError(f"--images-per-prompt {images_per_prompt}: expected at least 1 (leave it out for the "
                         "default 60 / 80 / 160)")


def _check_judge_inputs(clip, dino, semantics, fid_reference, fid_inception, images_per_model: int) -> None:
    """The semantics and FID models' inputs, refused before any image is made (they load after the images)."""
    # CLIP-T needs both of CLIP's towers: a CLIPModel folder (model_type clip), not a vision-only one
    for flag, folder, kinds, name in (("--clip", clip, ("clip",), "CLIPModel"),
                                      ("--dino", dino, ("dinov2",), "DINOv2")):
        if not folder:
            continue
        if not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder}: not a folder; give a local transformers model folder")
        try:
            kind = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        weights = [path for path in Path(folder).iterdir() if path.name.startswith(("model", "pytorch_model"))
                   and path.name.endswith((".safetensors", ".bin", ".index.json"))]
        found = [] if kind in kinds else [f"a {kind!r} model" if kind else "no model_type in a readable config.json"]
        found += [] if weights else ["no weight file"]
        if found:
            raise ValueError(f"{flag} {folder}: {' and '.join(found)}; give a local transformers {name} model folder "
                             "(as save_pretrained writes it)")
    if isinstance(semantics, str):
        from fastfair.hooks import check_call, load_callable

        # imported and its signature checked now; called once the images are made
        check_call(load_callable(semantics, "--semantics"), semantics, "--semantics", (None,), SEMANTICS_CALL)
    if fid_reference:
        from fastfair.evaluation.fid import reference_images

        if not Path(fid_reference).is_dir():
            raise ValueError(f"--fid-reference {fid_reference}: not a folder; give a folder of real images")
        reference_images(fid_reference)  # at least 2 of them
        if not Path(fid_inception).is_file() or not _is_torchscript(fid_inception):
            raise ValueError(f"--fid-inception {fid_inception}: not a TorchScript file; give a local TorchScript "
                             "feature extractor (torch.jit.save; uint8 [N,3,H,W] -> [N,D])")
        if images_per_model < 2:  # a covariance of one image
            raise ValueError(f"--fid-reference: FID compares two sets of at least 2 images, and this evaluation makes "
                             f"{images_per_model} per model; give more prompts or --images-per-prompt")


def _is_torchscript(path) -> bool:
    """Whether ``path`` is an archive torch.jit.save wrote (a zip holding the module's code), without loading it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _refuse_other_prompts(cache: ImageCache, prompts: Sequence[str]) -> None:
    """A --base-images folder serves one prompt list (images are filed by prompt position, at every guidance
    scale): another list would overwrite the images an evaluation sharing the folder is scoring, which then paired
    its finetuned images with other prompts' base images, unsaid. A longer list with the same start adds to it."""
    recorded = cache.prompts_by_position()
    for position, prompt in enumerate(prompts):
        if recorded.get(position, prompt) != prompt:
            raise StaleCacheError(f"{cache.root}: holds the base images of another prompt list (prompt {position + 1} "
                                  f"is {recorded[position]!r} there, {prompt!r} here; a base-images folder serves "
                                  "evaluations of the same prompts, in the same order)", ["prompts"], cache.flag)


def _at_or_below(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def canonical_path(spelled) -> str:
    """A model path as the image caches record it: absolute, so another spelling of the same folder (relative,
    from another working directory) keys the same images; a registered name (``toy``) and ``pkg://`` stay."""
    text = str(spelled)
    if not text or text in MODEL_REGISTRY or "://" in text:
        return text
    return str(Path(text).resolve())


def _canonical_paths(stored: dict) -> dict:
    """ImageCache's as_recorded_now for the model paths: a cache that recorded them as typed (before 2026-12-02)
    stays valid where they name the same folders from this working directory."""
    return {**stored, **{key: canonical_path(stored[key]) for key in ("model", "model_config", "finetuned")
                         if isinstance(stored.get(key), str)}}


def _base_settings(model, model_config, num_steps, seed, dtype, resolution) -> dict:
    """What the base model's cached images depend on (fastfair.evaluation.cache.ImageCache): another value
    regenerates them. The files' fingerprints, not only their paths: new weights under the same path must not
    reuse old images."""
    settings = {"model": canonical_path(model), "steps": num_steps, "seed": seed, "dtype": dtype,
                "resolution": resolution,
                "model_files": weight_fingerprint(resolve_model(model))}
    if model_config:  # a single-file model's architecture: another one gives other images from the same weights
        settings.update(model_config=canonical_path(model_config), model_config_files=weight_fingerprint(model_config))
    return settings


def _finetuned_settings(finetuned, weights, reads: Optional[Tuple[str, ...]]) -> dict:
    """What the finetuned model's images depend on besides `_base_settings`: of a training checkpoint, the files
    evaluation reads (reads: `checkpoint_reads`; not its state.pt, which a user may delete to save space, nor what
    else the folder comes to hold), of an export every weight and config file (reads None)."""
    return {"finetuned": canonical_path(finetuned or ""), "weights": weights,
            "finetuned_files": weight_fingerprint(finetuned, only=reads)}


def checkpoint_reads(finetuned) -> Optional[Tuple[str, ...]]:
    """The files evaluation reads from a training checkpoint folder (its weights and settings); None for an
    export or no finetuned model."""
    from fastfair.checkpoint import CONFIG_FILE, WEIGHT_FILES

    if not finetuned or finetuned_kind(finetuned) != "checkpoint":
        return None
    return (*WEIGHT_FILES, CONFIG_FILE)


def _as_recorded_now(reads: Optional[Tuple[str, ...]]):
    """ImageCache's as_recorded_now for a finetuned model whose files read are ``reads`` (`checkpoint_reads`): a
    cache an older version keyed by every file of a training checkpoint's folder (its state.pt too) stays valid
    when the files read now are unchanged."""
    if reads is None:
        return _canonical_paths

    def narrowed(stored: dict) -> dict:
        stored, files = _canonical_paths(stored), stored.get("finetuned_files")
        return {**stored, "finetuned_files": {k: v for k, v in files.items() if k in reads}} if isinstance(
            files, dict) else stored
    return narrowed


def _score_guidance(g, prompts, caches, count, scorer, sets, class_counts, counts, fid, base_measured=None) -> dict:
    """{model: {"per_prompt": {prompt: row}, "images": {prompt: paths}, "summary": ..., ["fid"]}} at guidance g,
    from the images cached in caches[model] (fastfair.evaluation.scoring.Scorer.rows gives each row).
    base_measured: {(guidance, prompt index, prompt): (Measured, FID features)} of the base images measured by
    an earlier evaluation of the sweep (read and filled here); None: measured here."""
    models = list(caches)
    by_model = {m: {"per_prompt": {}, "images": {}} for m in models}
    features = {m: [] for m in models}
    for p, prompt in enumerate(prompts):
        paths = {m: [image_path(g, m, p, j) for j in range(count)] for m in models}
        measured, key = {}, (f"{g:g}", p, prompt)
        for m in models:
            known = base_measured if m == "base" and base_measured is not None else {}
            if key not in known:
                images = from_png([caches[m].path(path) for path in paths[m]])
                known[key] = scorer.measure(images), fid(images) if fid else None
            measured[m], image_features = known[key]
            if fid:
                features[m].append(image_features)
        for m, row in scorer.rows(prompt, measured, sets, class_counts, counts).items():
            by_model[m]["per_prompt"][prompt] = row
            by_model[m]["images"][prompt] = paths[m]
    for m, data in by_model.items():
        data["summary"] = summarize(data["per_prompt"])
        if fid:
            data["fid"] = fid.distance(np.concatenate(features[m]))
    return by_model


def training_prompts_among(run_config, prompts: Sequence[str]) -> list:
    """The prompts that are also among those the run of run_config (a config.yaml) trained on: its data.sets
    rebuilt as the trainer builds them, compared as prompt files' repeats are (same_text_key)."""
    from fastfair.config import load_config
    from fastfair.prompts import build_prompt_mixture, same_text_key

    cfg = load_config(run_config)
    trained = {same_text_key(p) for ps in build_prompt_mixture(cfg.data, cfg.seed).sets.values() for p in ps}
    return [prompt for prompt in prompts if same_text_key(prompt) in trained]


def _warn_of_training_prompts(run_config, prompts: Sequence[str]) -> None:
    """A warning, not an error: evaluating on training prompts can be deliberate (how well the run fit them)."""
    import warnings

    try:
        seen = training_prompts_among(run_config, prompts)
    except (OSError, ValueError) as error:  # e.g. a prompt file since moved: the evaluation itself needs none
        warnings.warn(f"--finetuned: could not rebuild the training prompts of {run_config} ({error}); the evaluation "
                      "prompts are not checked against them", stacklevel=3)
        return
    if seen:
        warnings.warn(f"--prompts: {len(seen)} of {len(prompts)} evaluation prompts are among the prompts the "
                      f"finetuned run trained on (data.sets of {run_config}), e.g. {seen[0]!r}: their bias is not "
                      "held-out bias; evaluate held-out prompts (e.g. --prompts occupations:test, or the test split "
                      "of the run's prompt-set factory) unless you mean to measure the training prompts",
                      stacklevel=3)


def _fid_scorer(reference, inception, device):
    """The extractor, with ``distance(features)``: FID of generated features to the reference folder's."""
    from fastfair.evaluation.fid import FeatureExtractor, frechet_distance, reference_images

    extractor = FeatureExtractor(inception, device)
    # one image at a time: reference images may differ in size
    reference = np.concatenate([extractor(from_png([path])) for path in reference_images(reference)])
    extractor.distance = lambda generated: frechet_distance(generated, reference)
    return extractor


def _targets(items: Sequence[str]) -> Dict[str, list]:
    targets = {}
    for item in items:
        name, _, values = item.partition("=")
        name = ",".join(part.strip() for part in name.split(","))  # an intersection's: "gender, race" as "gender,race"
        if name in targets:
            raise ValueError(f"--target {name} is given twice ({name}={','.join(f'{v:g}' for v in targets[name])} and "
                             f"{item}): give each attribute's target once")
        try:
            targets[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--target {item!r}: expected ATTRIBUTE=P1,P2,... (class order of the classifier), "
                             "e.g. age=0.75,0.25, or A,B=P1,... for the cells of an intersection") from None
    return targets


def _detector_name(detector) -> str:
    """How the report names a detector spec: the backend name, a function's name, or a fallback list's names."""
    if isinstance(detector, (list, tuple)):
        return ",".join(_detector_name(d) for d in detector)
    return detector if isinstance(detector, str) else getattr(detector, "__name__", type(detector).__name__)


def evaluation_parser(description: str, finetuned: bool = True, prog: str = "python -m fastfair.evaluate"
                      ) -> argparse.ArgumentParser:
    """The flags of `evaluate`'s arguments (`evaluate_options` reads them); finetuned=False leaves out
    --finetuned and --base-images, for a command that supplies those itself (`fastfair.select_checkpoint`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True,
                        help="diffusers folder, single-file checkpoint, pkg://PACKAGE/PATH, or 'toy'")
    parser.add_argument("--model-config", help="with a single-file --model: " + SINGLE_FILE_CONFIG_LAYOUT)
    if finetuned:
        parser.add_argument("--finetuned", help="training checkpoint folder or a python -m fastfair.export folder")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"),
                        help="a checkpoint's weights to use (an export holds those it was written with)")
    parser.add_argument("--classifier", action="append", required=True, help="attribute classifier (repeatable)")
    parser.add_argument("--classifier-head",
                        help="what the outputs of --classifier files without fastfair metadata (e.g. the public "
                             "code's .pt) mean, in order: gender,race,age (FairFace's 8) or celeba40 (CelebA's 80)")
    parser.add_argument("--attributes", help="comma-separated attributes (default: all the classifiers predict)")
    parser.add_argument("--joint", action="append",
                        help="comma-separated attributes whose intersection is evaluated, e.g. gender,race "
                             "(repeatable; default: the intersection of all, when >= 2; '' for none)")
    parser.add_argument("--target", action="append", default=[],
                        help="ATTRIBUTE=P1,P2,... (default uniform), in the classifier's class order; A,B=P1,... "
                             "the cells of the intersection --joint A,B, row-major (default: the product of A's and "
                             "B's targets)")
    parser.add_argument("--prompts", default="occupations:test",
                        help="NAME[:SPLIT] of a shipped set (its items put in the set's template), a text file "
                             "of full prompts, one per line, used as written (unlike a training data.sets.<name>."
                             "file under a shipped set's name, whose lines are items put in that set's template), "
                             "or a prompt-set factory package.module:function[:SPLIT] (default split test; e.g. "
                             "fastfair.toy:occupation_prompts, the toy world's held-out occupations)")
    parser.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts")
    parser.add_argument("--images-per-prompt", type=int,
                        help="score every attribute set on N images per prompt (default: as the paper, each set on "
                             "60 / 80 / 160 images for K = 2 / 4 / 8 classes, the largest count generated)")
    parser.add_argument("--guidance-scales", default="7.5", help="comma-separated, e.g. 3,5,7.5,10")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the finetuned run's "
                        "model.resolution, as its checkpoint or export records it, else the model's own size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--detector", default="opencv",
                        help="opencv | insightface | mtcnn | none | module:function, or a comma-separated list tried "
                             "in order for the images the earlier ones find no face in (e.g. insightface,mtcnn)")
    parser.add_argument("--detector-path", help="insightface: the local model root (holding models/buffalo_l; "
                                                "default ~/.insightface)")
    parser.add_argument("--margin", type=float, default=FACE_MARGIN,
                        help=f"face crop margin (default {FACE_MARGIN}: the public code's, and faces.margin's)")
    parser.add_argument("--clip", help="local transformers CLIPModel folder (CLIP-T, CLIP-I)")
    parser.add_argument("--dino", help="local transformers DINOv2 folder (DINO)")
    parser.add_argument("--semantics", help="module:function returning a fastfair SemanticsLoss whose encoders "
                        "score finetuned vs base (e.g. fastfair.toy:toy_semantics)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--grid-columns", type=int, default=8)
    parser.add_argument("--fid-reference", help="folder of real images for FID (optional)")
    parser.add_argument("--fid-inception", help="TorchScript feature extractor for FID, uint8 [N,3,H,W] -> [N,D]")
    if finetuned:
        parser.add_argument("--base-images",
                            help="a folder caching the base model's images apart from --out, shared by evaluations "
                                 "of other finetuned models with the same settings and prompts (default: in "
                                 "OUT/images)")
    parser.add_argument("--out", required=True)
    return parser


def split_list(text: Optional[str]) -> Optional[list]:
    """'a, b,,c' -> ['a', 'b', 'c']; None or '' -> None (the flag's default)."""
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def evaluate_options(args: argparse.Namespace) -> dict:
    """`evaluate`'s keyword arguments from `evaluation_parser`'s flags (those it has), checked as the CLI's."""
    try:
        guidance = [float(v) for v in split_list(args.guidance_scales) or []]
    except ValueError:
        guidance = []
    if not guidance:
        raise ValueError(f"--guidance-scales {args.guidance_scales!r}: expected numbers like 3,5,7.5")
    problem = args.device and device_problem("--device", args.device)
    if problem:
        raise ValueError(problem)
    detector = detector_from_flags(args.detector, args.detector_path)
    # each --joint flag is one intersection (a lone name is refused, not joined with the next flag's); '' is none
    joint = None if args.joint is None else [names for names in map(split_list, args.joint) if names]
    prompts = load_prompts(args.prompts, args.max_prompts)
    options = dict(model=args.model, classifiers=args.classifier, prompts=prompts, out=args.out,
                   attributes=split_list(args.attributes), targets=_targets(args.target), joint=joint,
                   images_per_prompt=args.images_per_prompt, guidance_scales=guidance, num_steps=args.steps,
                   seed=args.seed, batch_size=args.batch_size, detector=detector, margin=args.margin,
                   clip=args.clip, dino=args.dino, dtype=args.dtype, weights=args.weights, device=args.device,
                   grid_columns=args.grid_columns, fid_reference=args.fid_reference,
                   fid_inception=args.fid_inception, semantics=args.semantics, model_config=args.model_config,
                   classifier_head=split_list(args.classifier_head), resolution=args.resolution)
    options.update({key: getattr(args, key) for key in ("finetuned", "base_images") if hasattr(args, key)})
    return options


def parse_args(argv=None) -> argparse.Namespace:
    return evaluation_parser("Evaluate bias and semantics preservation of a (finetuned) model.").parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    evaluate(**evaluate_options(args))
    print(Path(args.out) / "report.html")


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.evaluate",
                     "the images made so far are cached: the same command resumes"):
        main()
