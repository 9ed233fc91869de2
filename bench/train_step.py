"""One training iteration: the baseline (bench/baseline.py) versus fastfair, time, memory and FLOPs.

    python bench/train_step.py --model tiny|sd15 --images N --steps S --json OUT.json
           [--resolution PX] [--micro-batch M] [--rounds R] [--iters I] [--sweep-steps 5,10,20,40]
           [--sweep-images 1,2,4] [--budget-gib G]

Implementations (JSON ``impl``), on the same models (built from configs with random weights, saved and loaded
back through fastfair's loaders), prompt, noise and hardware; text-encoder LoRA (the public code's target):
- ``baseline_sdpa``: the public code's iteration (PyTorch SDPA attention, as its text-encoder runs have it; its
  U-Net gradient checkpointing at diffusers 0.19.3's granularity, ``baseline.checkpointed``): the reference for
  every ratio;
- ``baseline``: the same with diffusers' classic attention (``AttnProcessor``, as the public code's U-Net LoRA
  runs have it): what fused attention alone is worth;
- ``fastfair``: ``fastfair.dft.sample``, exact adjusted gradient, every step recomputed (lean: least memory);
- ``fastfair_fast``: keeps what fits in baseline_sdpa's peak P_base, as the trainer's ``sampler.memory_budget_gb``
  plans it (``fastfair.memory_budget.keeps_for_budget``): steps that keep their attention outputs (a steps,
  ``keep_attention_steps``: G_att bytes each, saving the attention's share r of a recompute's FLOPs) and whole
  graphs (k steps, ``keep_graph_steps``: G bytes each, no recompute), the most recompute saved per byte first. G,
  G_att and r are counted exactly in the lean worker on the iteration's own inputs. Each keep adds at most its
  bytes at any moment: from the lean peak P_0 the plan for P_base - P_0 fits; the lean worker measures the peak
  P_1 of that plan (a warm-up, then one iteration, as the fastfair_fast worker runs it) and extends it by
  P_base - P_1 (keeps live before the backward, where the lean peak often is not, so P_1 is usually well below
  P_0 plus the plan's bytes). The fastfair_fast run then checks the plan's peak in a fresh process and, if it is
  over P_base, shrinks the plan by the overshoot until it fits (``fit_fast_plan``; JSON ``plans_tried``): on CPU
  the in-process P_1 moves by several MiB;
- ``fastfair_k5``: ``grad_steps=5`` (unbiased subsample of 5 of the S steps).
Every fastfair mode recomputes the decoder's (block-wise; with --micro-batch per slice too) and the judges'
activations in the backward, as the trainer does by default (``loss.recompute_judges``, ``fastfair.recompute``);
the baseline keeps them, as published.
Each configuration runs in its own subprocess (warm-up iteration, then ``--iters`` timed ones); the rounds run
the configurations interleaved, and the table reports medians over all timed iterations (time) and over rounds
(memory). peak_bytes: an iteration's peak above the level after models, optimizer state and warm-up
(``bench/_memory.py``): on CUDA the timed iterations'; on CPU one iteration's in a second subprocess of the
configuration, with every buffer mapped on its own (``worker_env``), which would slow the timed ones by 15-20%.
Phases: sampling (every sampler forward), decode_losses (decode, judges, targets; for fastfair also the backward
to dL/dz_0), backward (the unroll's backward: baseline through the checkpointed graph, decoder and judges;
fastfair the recompute), optimizer (AdamW step). --micro-batch M: the baseline's gradient pass in micro-batches of
M images (the public code's), fastfair's recompute M images per U-Net call (``recompute_images``) and its
decoder and judges M images per call (``loss.judge_images``).

The loss (``Objective``): alignment cross-entropy of a face classifier on the image's centre crop (no detector:
detection is not differentiable and costs the same in both) to the expected-OT targets of a skewed gender
distribution (a uniform one ties a single image's target: no class, no alignment loss), plus 1 - cos of CLIP and
DINOv2 embeddings against the frozen model's image of the same noise.
Models: ``tiny`` (test-sized, fastfair.testing.make_world) or ``sd15`` (SD 1.5 shapes: U-Net 860M,
VAE, CLIP ViT-L/14 text encoder; CLIP ViT-H/14 and DINOv2 ViT-B/14 vision towers; MobileNetV3-Large
classifier). Frozen weights in --dtype (default fp16 on CUDA, fp32 on CPU), LoRA in fp32. FLOP model: bench/flops.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
# the bench helpers, and fastfair from this checkout (fastfair.kernels, which setup.py maps from kernels/, needs
# the installed package: bench/gpu_check.sh installs it without the native extension where that build fails)
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _memory import PeakMemory, worker_env  # noqa: E402
from _workers import add_worker_flag, spawn, worker_or_none  # noqa: E402
from baseline import baseline_iteration, checkpointed, set_classic_attention  # noqa: E402
from flops import count_flops, count_input_backward_flops, iteration_flops, matmul_rate  # noqa: E402
from fastfair.files import write_text  # noqa: E402
from fastfair.run_control import sigterm_as_exit  # noqa: E402

IMPLS = ("baseline_sdpa", "baseline", "fastfair", "fastfair_k5", "fastfair_fast")
PROMPT = "a photo of the face of a doctor"
GUIDANCE = 7.5


# ----------------------------------------------------------------------------- the objective

class Objective:
    """decode(z) -> images [N, 3, H, W]; logits(images) -> [N, K] of the classifier on the centre crop;
    targets(logits) -> expected-OT q [N, K] for the target p_k proportional to K - k (not uniform: one image's q
    is the target itself, and a tied q has no class to align to, which would leave the alignment loss, and its
    backward through the classifier and decoder, out of the benchmark); embed_originals(images) -> {name: [N, D]};
    loss(images, logits, q, originals, total) = sum_rows (CE_q + sum_enc (1 - cos)) / total."""

    def __init__(self, vae, classifier, semantics):
        from fastfair.models import LatentDecoder

        self.decoder = LatentDecoder(vae, clamp=False)
        self.classifier, self.semantics = classifier, semantics

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        crop = images[..., h // 4:h - h // 4, w // 4:w - w // 4]
        size = self.classifier.input_size
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        dtype = next(self.classifier.parameters()).dtype
        return self.classifier(crop.to(dtype)).float()

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        from fastfair.losses import expected_ot_targets

        probs = logits.detach().double().softmax(-1)
        k = probs.shape[-1]
        target = torch.arange(k, 0, -1, dtype=torch.float64)
        return expected_ot_targets(probs, target / target.sum()).to(logits.dtype)

    def embed_originals(self, images: torch.Tensor) -> dict:
        return self.semantics.embed_originals(images)

    def loss(self, images, logits, q, originals, total: int) -> torch.Tensor:
        from fastfair.losses import alignment_loss

        semantic = sum(v.sum() for v in self.semantics(images, originals).values())
        return (alignment_loss(logits, q, 0.0, reduction="sum") + semantic) / total


def baseline_step(model, scheduler, objective, z_T, prompt, *, num_steps, micro_batch=None, phase=None):
    """The baseline's gradient for ``objective`` (bench/baseline.py with this module's loss interface)."""
    class _Judged:  # baseline.py's objective interface: targets from images, loss from images
        decode, embed_originals = objective.decode, objective.embed_originals

        @staticmethod
        def targets(images):
            return objective.targets(objective.logits(images))

        @staticmethod
        def loss(images, q, originals, total):
            return objective.loss(images, objective.logits(images), q, originals, total)

    kwargs = {"phase": phase} if phase is not None else {}
    return baseline_iteration(model, scheduler, _Judged, z_T, prompt, num_steps=num_steps,
                              guidance_scale=GUIDANCE, micro_batch=micro_batch, **kwargs)


def sampler_inputs(model, z_T, prompt):
    """(z, cond, uncond) of fastfair's sampler call: the frozen model's n rows first, then the finetuned n rows
    (``frozen_rows=n``), both from the same noise z_T [n, C, H, W]."""
    n = z_T.shape[0]
    both = lambda a, b: torch.cat([a.expand(n, -1, -1), b.expand(n, -1, -1)])  # noqa: E731
    cond = both(model.encode_original([prompt]), model.encode([prompt]))
    uncond = both(model.encode_original([""]), model.encode([""], positive=False))
    return torch.cat([z_T, z_T]), cond, uncond


def fastfair_step(model, scheduler, objective, z_T, prompt, *, num_steps, phase=None, **engine):
    """fastfair's iteration gradient: frozen and finetuned rows in the same sampler calls (``frozen_rows``), the
    loss's dL/dz_0, then the adjusted backward of ``fastfair.dft.sample`` (engine: its keyword options)."""
    from fastfair.dft import sample

    phase = phase or (lambda name: contextlib.nullcontext())
    n = z_T.shape[0]
    with phase("sampling"):
        z, cond, uncond = sampler_inputs(model, z_T, prompt)
        z0 = sample(model.unet, scheduler, z, cond, uncond, num_steps=num_steps,
                    guidance_scale=GUIDANCE, coefficients="paper", frozen_rows=n, **engine)
    with phase("decode_losses"):
        loss, grad = judged_loss(objective, z0[:n], z0[n:])
    with phase("backward"):
        z0.backward(torch.cat([torch.zeros_like(grad), grad]))
    return loss


def judged_loss(objective, z_orig: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastfair's decode-and-judge phase: the originals (latents z_orig [n, ...]) decoded and embedded without a
    graph, the finetuned latents z decoded and judged with one, and the backward to z. Returns (loss, dL/dz)."""
    with torch.no_grad():
        originals = objective.embed_originals(objective.decode(z_orig))
    leaf = z.detach().requires_grad_()
    images = objective.decode(leaf)
    logits = objective.logits(images)
    loss = objective.loss(images, logits, objective.targets(logits), originals, z.shape[0])
    loss.backward()
    return loss.detach(), leaf.grad


# ----------------------------------------------------------------------------- models on disk

def save_models(kind: str, root: Path, resolution: int) -> dict:
    """Write the models of ``kind`` under root; returns the paths the workers load."""
    root = Path(root)
    if kind == "tiny":
        from fastfair.testing import make_world

        files = make_world(root)
        return {k: str(v) for k, v in files.items()}
    if kind != "sd15":
        raise ValueError(f"--model {kind!r}: expected 'tiny' or 'sd15'")
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              Dinov2Config, Dinov2Model)

    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier
    from fastfair.testing import SD15_SCHEDULER

    torch.manual_seed(0)
    from fastfair.testing import write_tokenizer

    tokenizer = write_tokenizer(root / "_vocab")
    tokenizer.model_max_length = 77
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768,
                                        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                                        pad_token_id=len(tokenizer) - 1))
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)  # SD 1.x's U-Net
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=resolution, scaling_factor=0.18215)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                            scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "sd")
    vision = dict(image_size=224, patch_size=14)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                   num_attention_heads=16, projection_dim=1024, **vision)
                                  ).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             **vision)).save_pretrained(root / "dino")
    processor = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3}
    for name in ("clip", "dino"):
        (root / name / "preprocessor_config.json").write_text(json.dumps(processor))
    save_classifier(AttributeClassifier(head_from_names(["gender"]), "mobilenet_v3_large", input_size=224),
                    str(root / "gender.safetensors"))
    return {"sd": str(root / "sd"), "classifier": str(root / "gender.safetensors"), "clip": str(root / "clip"),
            "dino": str(root / "dino")}


def recompute_objective(objective: "Objective", rows: Optional[int] = None) -> "Objective":
    """``objective``'s decoder and judges recomputed in the backward, in slices of ``rows`` images when set (the
    trainer's loss.recompute_judges and loss.judge_images, ``fastfair.recompute.recompute_judges``); in place."""
    from fastfair.recompute import recompute_judges

    objective.decoder, objective.semantics, judges = recompute_judges(
        objective.decoder, objective.semantics, {"classifier": objective.classifier}, rows)
    objective.classifier = judges["classifier"]
    return objective


def models_on_disk(kind: str, root: Path, resolution: int) -> dict:
    """The paths of ``kind``'s models under root: those a run saved there before (root/paths.json, which names
    their kind: another kind's are refused, not benchmarked under this one's name), else saved now
    (``save_models``). The resolution sets only the U-Net's default sample size, which no benchmark reads."""
    paths_file = Path(root) / "paths.json"
    if paths_file.exists():
        saved = json.loads(paths_file.read_text())
        if saved.get("kind") != kind:
            then = f"{saved['kind']} models" if "kind" in saved else "models of an older bench (kind not recorded)"
            raise SystemExit(f"--models-dir {root} holds {then}, not {kind} ones: give another --models-dir, or "
                             "delete that folder")
        return saved["paths"]
    print(f"saving {kind} models to {root}", flush=True)
    paths = save_models(kind, root, resolution)
    # written last, atomically: a save stopped halfway leaves no paths.json
    write_text(paths_file, json.dumps({"kind": kind, "resolution": resolution, "paths": paths}))
    return paths


# ----------------------------------------------------------------------------- one configuration (worker)

class PhaseTimer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(name: str, device: str) -> torch.dtype:
    """The frozen models' dtype: --dtype, where ``auto`` is fp16 on CUDA (the public code's) and fp32 on CPU."""
    return DTYPES[name] if name != "auto" else (torch.float16 if device.startswith("cuda") else torch.float32)


def load_setup(paths: dict, device: str, lora_rank: int, dtype: Optional[torch.dtype] = None):
    """(model, scheduler, objective, optimizer) from the saved files, through fastfair's loaders; frozen weights
    in ``dtype`` (default ``frozen_dtype("auto", device)``), LoRA in fp32."""
    dtype = dtype or frozen_dtype("auto", device)
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    parts = load_stable_diffusion(paths["sd"], dtype, "sdpa", device)
    torch.manual_seed(0)
    lora = SimpleNamespace(rank=lora_rank, alpha=None, dropout=0.0, unet_modules=["to_q", "to_k", "to_v", "to_out.0"],
                           text_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, "text_lora", lora=lora)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, parts.scheduler, load_objective(paths, device, dtype, parts.vae), optimizer


def load_objective(paths: dict, device: str, dtype: torch.dtype, vae=None) -> "Objective":
    """The loss's models from the saved files, frozen in ``dtype``; the VAE read from the model's vae/ folder
    unless given."""
    from fastfair.classifiers import load_classifier
    from fastfair.losses import SemanticsLoss

    if vae is None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(paths["sd"]) / "vae", torch_dtype=dtype).to(device)
        vae.requires_grad_(False).eval()
    classifier = load_classifier(paths["classifier"]).to(device, dtype).requires_grad_(False)
    semantics = SemanticsLoss.from_config({"clip": {"backend": "clip", "path": paths["clip"]},
                                           "dino": {"backend": "dinov2", "path": paths["dino"]}}, dtype, device)
    return Objective(vae, classifier, semantics)


def unet_backward_units(unet, z, t, leaf) -> dict:
    """{"unet_input_backward": Ub, "unet_recompute": Ur} of one U-Net call at (z, t) with the text embedding
    ``leaf`` the only input needing a gradient (bench/flops.py). Ur is measured, not summed over the checkpointed
    modules: the first resnet's input needs no gradient, so it is never recomputed, and torch's checkpoint stops a
    segment's recompute at the last tensor the backward needs."""
    call = lambda: unet(z, t, encoder_hidden_states=leaf).sample  # noqa: E731
    backward = count_input_backward_flops(call, [leaf])
    with checkpointed(unet):
        return {"unet_input_backward": backward,
                "unet_recompute": count_input_backward_flops(call, [leaf]) - backward}


def unit_flops(model, objective, latent, device) -> dict:
    """The FLOP model's units (bench/flops.py) at these shapes."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = model.unet
    processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())  # explicit matmuls: counted on every device
    z = torch.randn(1, *latent, device=device, dtype=unet.dtype)
    emb = model.encode_original([PROMPT])
    t = torch.tensor([500], device=device)
    leaf = emb.detach().to(unet.dtype).requires_grad_()  # the recompute's only gradient path (text LoRA)
    call = lambda: unet(z, t, encoder_hidden_states=emb.to(unet.dtype))  # noqa: E731
    # the classic processor's attention is its only batched matmuls: scores (baddbmm) and probs @ V (bmm)
    units = {"unet": count_flops(call),
             "unet_attention": count_flops(call, {torch.ops.aten.bmm, torch.ops.aten.baddbmm}),
             **unet_backward_units(unet, z, t, leaf),
             "text": count_flops(lambda: model.encode_original([PROMPT]))}
    unet.set_attn_processor(processors)
    with torch.no_grad():
        images = objective.decode(z.float())
    units["vae_decode"] = count_flops(lambda: objective.decode(z.float()))
    units["embed"] = count_flops(lambda: objective.embed_originals(images))
    units["judges"] = units["embed"] + count_flops(lambda: objective.logits(images))
    return units


def worker(cfg: dict) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(cfg["threads"])
    impl, steps, n = cfg["impl"], cfg["steps"], cfg["images"]
    model, scheduler, objective, optimizer = load_setup(cfg["paths"], device, cfg["lora_rank"],
                                                         frozen_dtype(cfg["dtype"], device))
    if impl.startswith("fastfair"):  # the trainer's loss.recompute_judges (+ judge_images); the public code keeps all
        recompute_objective(objective, cfg.get("micro_batch"))
    if impl == "baseline":
        set_classic_attention(model.unet)
    latent = (model.unet.config.in_channels, cfg["latent"], cfg["latent"])
    z_T = torch.randn((n,) + latent, generator=torch.Generator().manual_seed(0)).to(device)
    engine = {"fastfair_k5": {"grad_steps": min(5, steps), "generator": torch.Generator().manual_seed(0)},
              "fastfair_fast": {"keep_graph_steps": cfg.get("keep_graph_steps", 0),
                                "keep_attention_steps": cfg.get("keep_attention_steps", 0)}}.get(impl, {})
    if impl.startswith("fastfair"):  # --micro-batch: the recompute's images per U-Net call (sampler.recompute_images)
        engine["recompute_images"] = cfg.get("micro_batch")

    def iteration(timer, **extra):
        optimizer.zero_grad(set_to_none=True)
        if impl.startswith("baseline"):
            baseline_step(model, scheduler, objective, z_T, PROMPT, num_steps=steps,
                          micro_batch=cfg.get("micro_batch"), phase=timer)
        else:
            fastfair_step(model, scheduler, objective, z_T, PROMPT, num_steps=steps, phase=timer,
                          **{**engine, **extra})
        with timer("optimizer"):
            optimizer.step()

    for _ in range(cfg["warmup"]):
        iteration(PhaseTimer(device))
    memory = PeakMemory(device)  # read on CUDA; on CPU run_worker takes the peak from the memory worker
    memory.start()
    times, phases = [], defaultdict(list)
    for _ in range(cfg["iters"]):
        timer = PhaseTimer(device)
        start = time.perf_counter()
        iteration(timer)
        times.append(time.perf_counter() - start)
        for name, value in timer.seconds.items():
            phases[name].append(value)
    if not cfg["iters"]:  # a memory worker (run_worker): one iteration's peak
        iteration(PhaseTimer(device))
    result = {"impl": impl, "model": cfg["model"], "images": n, "steps": steps, "device": device,
              "s_per_iter_samples": times, "phases_samples": dict(phases), "peak_bytes": memory.peak(),
              "micro_batch": cfg.get("micro_batch") or n, "latent": list(latent),
              "judge_images": cfg.get("micro_batch") if impl.startswith("fastfair") else None}
    if impl == "fastfair" and cfg.get("probe_keep"):  # G and G_att per kept step: fastfair_fast's costs
        from fastfair.memory_budget import attention_keep_costs, graph_bytes_per_step, keeps_for_budget

        z, cond, uncond = sampler_inputs(model, z_T, PROMPT)
        args = (model.unet, z, 0, cond, uncond, GUIDANCE, n)
        per_step = graph_bytes_per_step(*args)
        per_attention, share = attention_keep_costs(*args) or (None, None)
        result["kept_graph_bytes"] = per_step  # with sampler.lean_graph, as the engine builds graphs
        result["kept_attention_bytes"] = per_attention
        result["kept_attention_share"] = share  # r: the attention's share of a step's recompute FLOPs
        result["kept_graph_bytes_plain"] = graph_bytes_per_step(*args, lean=False)
        if cfg.get("budget_bytes"):  # baseline_sdpa's peak: the kept steps that fit in it
            budget = cfg["budget_bytes"]
            keeps = keeps_for_budget(max(budget - result["peak_bytes"], 0), per_step, per_attention, steps,
                                     attention_share=share)
            if 0 < sum(keeps) and keeps != (steps, 0):  # one iteration at that plan, after a warm-up at it (the
                plan = {"keep_graph_steps": keeps[0], "keep_attention_steps": keeps[1]}  # fast worker's too),
                iteration(PhaseTimer(device), **plan)    # measures its peak; each further keep adds at most its
                memory.start()                           # bytes
                iteration(PhaseTimer(device), **plan)
                result["peak_bytes_at_first_plan"] = [list(keeps), memory.peak()]
                keeps = keeps_for_budget(max(budget - memory.peak(), 0), per_step, per_attention, steps, keeps,
                                         attention_share=share)
            result["keeps_for_budget"] = list(keeps)
    if cfg.get("count_flops"):
        result["unit_flops"] = unit_flops(model, objective, latent, device)
        result["matmul_flops_per_s"] = matmul_rate(device, frozen_dtype(cfg["dtype"], device))
        if device == "cuda":
            result["device_name"] = torch.cuda.get_device_name(0)
    return result


# ----------------------------------------------------------------------------- the run (parent)

MEMORY_RESULTS = ("peak_bytes", "kept_", "keeps_")  # result keys (prefixes) a CPU memory worker measures


def _spawn(cfg: dict, env: dict) -> dict:
    return spawn(__file__, cfg, cfg["impl"], env)


def run_worker(cfg: dict, peak_limit: Optional[int] = None) -> dict:
    """One configuration's result. On CUDA one subprocess times it and reads the allocator's peak; on CPU the
    timed iterations run with the default allocator, and a second subprocess under ``worker_env()`` runs one
    iteration for the peak and the kept-step probes (``cfg["iters"] == 0``: the memory subprocess only). On CPU a
    peak above ``peak_limit`` returns the memory subprocess's result alone, untimed."""
    if torch.cuda.is_available():
        return _spawn(cfg, dict(os.environ))
    memory = _spawn(dict(cfg, iters=0, count_flops=False), worker_env())
    if not cfg["iters"] or (peak_limit is not None and memory["peak_bytes"] > peak_limit):
        return memory
    timed = _spawn(dict(cfg, probe_keep=False, budget_bytes=None), dict(os.environ))
    return {**timed, **{k: v for k, v in memory.items() if k.startswith(MEMORY_RESULTS)}}


def fit_fast_plan(cfg: dict, budget: int, lean: dict) -> Tuple[dict, list]:
    """fastfair_fast's run (round 0) at the lean worker's plan when its peak, measured in the configuration's own
    fresh process, is within ``budget``; else at a smaller plan: keeps_for_budget of the plan's modelled bytes
    (k G + a G_att) less the overshoot, until one fits (the lean plan (0, 0) always ends it). The lean worker's
    in-process peak on CPU (resident set) moves by several MiB with what the process did before; the fresh
    process's agrees with the timed run's. Returns (result, [[plan, peak_bytes], ...] for every plan tried)."""
    from fastfair.memory_budget import keeps_for_budget

    graph, attention = lean["kept_graph_bytes"], lean.get("kept_attention_bytes")
    plan, tried = tuple(lean["keeps_for_budget"]), []
    while True:
        last = plan == (0, 0)  # the lean plan is timed whatever its peak: nothing smaller is left to try
        result = run_worker(dict(cfg, keep_graph_steps=plan[0], keep_attention_steps=plan[1]),
                            peak_limit=None if last else budget)
        tried.append([list(plan), result["peak_bytes"]])
        if result["peak_bytes"] <= budget or last:
            return result, tried
        modelled = plan[0] * graph + plan[1] * (attention or 0)
        smaller = keeps_for_budget(max(modelled - (result["peak_bytes"] - budget), 0), graph, attention,
                                   cfg["steps"], attention_share=lean.get("kept_attention_share"))
        plan = smaller if smaller != plan else (0, 0)


def summarize(runs: list, args, flops_info: dict) -> list:
    """One row per impl: medians, ratios against baseline_sdpa, the FLOP model beside the measurement."""
    rows = []
    for impl in [i for i in IMPLS if any(r["impl"] == i for r in runs)]:
        mine = [r for r in runs if r["impl"] == impl]
        times = [t for r in mine for t in r["s_per_iter_samples"]]
        phases = {name: statistics.median([v for r in mine for v in r["phases_samples"].get(name, [])])
                  for name in mine[0]["phases_samples"]}
        row = {"impl": impl, "model": args.model, "images": args.images, "steps": args.steps,
               "s_per_iter": statistics.median(times),
               "peak_bytes": int(statistics.median(r["peak_bytes"] for r in mine)),
               "phases_s": phases, "timed_iterations": len(times), "micro_batch": mine[0]["micro_batch"],
               "judge_images": mine[0].get("judge_images")}
        row["s_per_image"] = row["s_per_iter"] / args.images
        keep = mine[0].get("keep_graph_steps", 0)
        keep_attention = mine[0].get("keep_attention_steps", 0)
        if impl == "fastfair_fast":
            row["keep_graph_steps"], row["keep_attention_steps"] = keep, keep_attention
            row["plans_tried"] = next((r["plans_tried"] for r in mine if "plans_tried" in r), None)
        if flops_info:
            micro = math.ceil(args.images / row["micro_batch"]) if impl.startswith("baseline") else 1
            model_flops = iteration_flops(impl, flops_info["unit_flops"], args.images, args.steps, micro, keep,
                                          min(5, args.steps) if impl == "fastfair_k5" else None, keep_attention,
                                          sliced_judges=mine[0].get("judge_images") is not None)
            row["model_flops"] = model_flops
            row["achieved_flops_per_s"] = model_flops["total"] / row["s_per_iter"]
            row["floor_s"] = model_flops["total"] / flops_info["matmul_flops_per_s"]
            row["s_over_floor"] = row["s_per_iter"] / row["floor_s"]
        rows.append(row)
    ref = next((r for r in rows if r["impl"] == "baseline_sdpa"), None)
    for row in rows:
        if ref is not None:
            row["speedup_per_image_vs_baseline_sdpa"] = ref["s_per_image"] / row["s_per_image"]
            # a CPU run's peak is its resident set's growth, which can be none (memory freed before, reused)
            row["peak_vs_baseline_sdpa"] = (row["peak_bytes"] / ref["peak_bytes"]
                                            if ref["peak_bytes"] > 0 and row["peak_bytes"] >= 0 else None)
            if "model_flops" in row:
                row["model_speedup_vs_baseline_sdpa"] = ref["model_flops"]["total"] / row["model_flops"]["total"]
    return rows


def _ratio(value: Optional[float], spec: str = ".3f", scale: float = 1.0) -> str:
    """value / scale formatted by spec; "-" where it was not measured (no baseline_sdpa in --impls, no FLOP model):
    a 0.00 there read as a measured speedup of zero."""
    return "-" if value is None else format(value / scale, spec)


def _keeps_label(row: dict) -> str:
    if "keep_graph_steps" not in row:
        return ""
    return f" (k={row['keep_graph_steps']}, a={row.get('keep_attention_steps', 0)})"


def markdown(rows: list, sweep: list, meta: dict) -> str:
    lines = [f"Device: {meta['device']}; model {meta['model']}, {meta['images']} images, {meta['steps']} steps, "
             f"latent {meta['latent']}; {meta['date']}. Medians of {meta['rounds']} interleaved rounds.", "",
             "| impl | s/iter | s/image | speedup vs baseline_sdpa | FLOP-model speedup | peak MiB | peak / "
             "baseline_sdpa | sampling s | decode+losses s | backward s | optimizer s | model TFLOP | "
             "achieved TFLOP/s | floor s | s / floor |", "|" + "---|" * 15]
    for r in rows:
        ph, mf = r["phases_s"], r.get("model_flops", {})
        lines.append(
            f"| {r['impl']}{_keeps_label(r)} "
            f"| {r['s_per_iter']:.3f} | {r['s_per_image']:.3f} "
            f"| {_ratio(r.get('speedup_per_image_vs_baseline_sdpa'), '.2f')} "
            f"| {_ratio(r.get('model_speedup_vs_baseline_sdpa'), '.2f')} | {r['peak_bytes'] / 2**20:.1f} "
            f"| {_ratio(r.get('peak_vs_baseline_sdpa'))} | {ph.get('sampling', 0):.3f} "
            f"| {ph.get('decode_losses', 0):.3f} | {ph.get('backward', 0):.3f} | {ph.get('optimizer', 0):.4f} "
            f"| {_ratio(mf.get('total'), '.4f', 1e12)} "
            f"| {_ratio(r.get('achieved_flops_per_s'), '.4f', 1e12)} | {_ratio(r.get('floor_s'), '.4f')} "
            f"| {_ratio(r.get('s_over_floor'), '.1f')} |")
    if meta.get("matmul_flops_per_s"):
        lines += ["", f"Measured dense matmul rate: {meta['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s "
                      f"({meta['matmul_dtype']}); FLOP model: bench/flops.py."]
    if meta.get("kept_graph_bytes"):
        plain, attention = meta.get("kept_graph_bytes_plain"), meta.get("kept_attention_bytes")
        share = meta.get("kept_attention_share")
        lines += ["", f"fastfair_fast: one kept step's graph holds {meta['kept_graph_bytes'] / 2**20:.1f} MiB "
                      + (f"({plain / 2**20:.1f} MiB with plain autograd, without fastfair.lean_graph) " if plain
                         else "")
                      + (f"and a step keeping its attention outputs only {attention / 2**20:.2f} MiB " if attention
                         else "")
                      + "(counted exactly, fastfair.memory_budget)"
                      + (f"; attention is {100 * share:.1f}% of a step's recompute FLOPs" if share is not None
                         else "")
                      + "; k whole graphs and a attention-only keeps: the most recompute saved within "
                        "baseline_sdpa's peak (bench/train_step.py's docstring)."]
        tried = next((r.get("plans_tried") for r in rows if r.get("plans_tried")), None)
        if tried:
            lines[-1] += (" Plans (k, a) tried, peak MiB in a fresh process: "
                          + ", ".join(f"({p[0]}, {p[1]}) {b / 2**20:.1f}" for p, b in tried) + ".")
    if sweep:
        lines += ["", "Peak memory (MiB) versus steps and images (one iteration each):", "",
                  "| impl | images | steps | peak MiB |", "|---|---:|---:|---:|"]
        lines += [f"| {r['impl']} | {r['images']} | {r['steps']} | {r['peak_bytes'] / 2**20:.1f} |" for r in sweep]
        for line in meta.get("fits", []):
            lines.append("\n" + line)
    return "\n".join(lines)


SWEEP_KEYS = ("impl", "images", "steps", "peak_bytes")


def sweep_order(point: dict) -> tuple:
    return point["impl"], point["images"], point["steps"]


def largest_batch(sweep: list, impl: str, steps: int, budget: int):
    """Images per batch that fit ``budget`` by the line through the two largest measured batches."""
    points = sorted((r["images"], r["peak_bytes"]) for r in sweep if r["impl"] == impl and r["steps"] == steps)
    if len(points) < 2:
        return None
    (n0, p0), (n1, p1) = points[-2:]
    slope = (p1 - p0) / (n1 - n0)
    return None if slope <= 0 else int((budget - p0) / slope + n0)


def write_report(runs: list, sweep: list, args, argv, flops_info: dict, impls: list, final: bool) -> None:
    """The table (printed when ``final``) and, with --json, the JSON and Markdown files of the runs so far."""
    rows = summarize(runs, args, flops_info)
    sweep_images = [int(s) for s in args.sweep_images.split(",") if s]
    meta = {"device": flops_info.get("device_name", runs[0]["device"]), "model": args.model, "images": args.images,
            "steps": args.steps, "latent": runs[0]["latent"], "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d"), "matmul_flops_per_s": flops_info.get("matmul_flops_per_s"),
            "matmul_dtype": str(frozen_dtype(args.dtype, runs[0]["device"])).replace("torch.", ""),
            "unit_flops": flops_info.get("unit_flops"),
            **{key: next((r[key] for r in runs if key in r), None)
               for key in ("kept_graph_bytes", "kept_graph_bytes_plain", "kept_attention_bytes",
                           "kept_attention_share")}}
    ref = next((r for r in rows if r["impl"] == "baseline_sdpa"), None)
    budget = int(args.budget_gib * 2**30) if args.budget_gib else (ref["peak_bytes"] if ref else None)
    if sweep_images and budget and budget > 0:
        meta["fits"] = [f"Largest batch within {budget / 2**20:.0f} MiB (linear in images, estimated): {impl} "
                        f"{largest_batch(sweep, impl, args.steps, budget)}" for impl in ("baseline_sdpa", "fastfair")
                        if impl in impls]
    table = markdown(rows, sweep, meta)
    if final:
        print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        command = "python bench/train_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        for path, text in ((args.json, json.dumps({"device": meta["device"], "meta": meta, "results": rows,
                                                    "sweep": sweep, "runs": runs}, indent=1)),
                           (os.path.splitext(args.json)[0] + ".md", f"Command: `{command}`\n\n{table}\n")):
            write_text(path, text)  # replaced whole: a run stopped mid-write keeps the last report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 512 sd15 on CUDA, 128 sd15 "
                        "on CPU, 16 tiny)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="frozen weights' dtype (default: fp16 on CUDA, fp32 on CPU); LoRA stays fp32")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="images per gradient micro-batch: the baseline's gradient pass, fastfair's recompute "
                             "calls (recompute_images) and its decoder and judges (loss.judge_images) "
                             "(default N)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per configuration and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else 4)
    parser.add_argument("--sweep-steps", default="", help="e.g. 5,10,20,40: peak memory versus steps")
    parser.add_argument("--sweep-images", default="", help="e.g. 1,2,4: peak memory versus images")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory budget for the largest-batch estimate (default: baseline_sdpa's peak)")
    parser.add_argument("--models-dir", default=None, help="reuse/keep the saved models here")
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    add_worker_flag(parser)
    args = parser.parse_args(argv)
    if worker_or_none(args, worker):
        return
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        parser.error(f"--impls {args.impls!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'} "
                     f"(choose from {', '.join(IMPLS)})")
    for flag in ("images", "steps", "rounds", "iters", "micro_batch", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        sweeps = [int(n) for text in (args.sweep_steps, args.sweep_images) for n in text.split(",") if n]
    except ValueError:
        sweeps = [0]
    if min(sweeps, default=1) < 1:
        parser.error(f"--sweep-steps {args.sweep_steps!r} / --sweep-images {args.sweep_images!r}: comma-separated "
                     "counts >= 1, e.g. 5,10,40")
    cuda = torch.cuda.is_available()
    factor = 8 if args.model == "sd15" else 2  # the VAE's
    if args.resolution is not None and (args.resolution < 1 or args.resolution % factor):
        parser.error(f"--resolution {args.resolution}: a positive multiple of {factor} (the {args.model} VAE's factor)")
    resolution = args.resolution or ({"tiny": 16, "sd15": 512 if cuda else 128}[args.model])
    tmp = tempfile.TemporaryDirectory(prefix="fastfair-bench-") if args.models_dir is None else None
    paths = models_on_disk(args.model, Path(args.models_dir or tmp.name), resolution)
    base = {"model": args.model, "images": args.images, "steps": args.steps, "paths": paths, "dtype": args.dtype,
            "latent": resolution // factor, "lora_rank": 50 if args.model == "sd15" else 4,
            "threads": args.threads, "warmup": args.warmup, "iters": args.iters, "micro_batch": args.micro_batch}
    runs, keep, flops_info = [], None, {}

    def report(sweep: list, final: bool) -> None:  # flops_info is filled in by the first run
        write_report(runs=runs, sweep=sweep, args=args, argv=argv, flops_info=flops_info, impls=impls, final=final)

    for round_ in range(args.rounds):
        for impl in impls:
            # the keep probe costs a backward with hooks and only fastfair_fast's plan uses it
            cfg = dict(base, impl=impl, probe_keep=round_ == 0 and "fastfair_fast" in impls,
                       count_flops=not flops_info and round_ == 0)
            result = None  # fastfair_fast's first run comes from fit_fast_plan
            ref = next((r for r in runs if r["impl"] == "baseline_sdpa"), None)
            if impl == "fastfair" and ref is not None and "fastfair_fast" in impls:
                cfg["budget_bytes"] = ref["peak_bytes"]
            if impl == "fastfair_fast":
                if keep is None:
                    lean = next((r for r in runs if "keeps_for_budget" in r), None)
                    if ref is None or lean is None:
                        raise ValueError("fastfair_fast needs baseline_sdpa and fastfair earlier in --impls")
                    result, tried = fit_fast_plan(cfg, ref["peak_bytes"], lean)
                    keep = tried[-1][0]
                    result["plans_tried"] = tried
                    print(f"fastfair_fast: a kept graph holds {lean['kept_graph_bytes'] / 2**20:.1f} MiB, a step's "
                          f"attention outputs {(lean['kept_attention_bytes'] or 0) / 2**20:.2f} MiB; of {args.steps} "
                          f"steps keeping {keep[0]} graphs and {keep[1]} attention-only (plans tried, peak MiB: "
                          + ", ".join(f"{tuple(p)} {b / 2**20:.1f}" for p, b in tried) + ")", flush=True)
                cfg["keep_graph_steps"], cfg["keep_attention_steps"] = keep
            if result is None:
                result = run_worker(cfg)
            result["keep_graph_steps"] = cfg.get("keep_graph_steps", 0)
            result["keep_attention_steps"] = cfg.get("keep_attention_steps", 0)
            if "unit_flops" in result:
                flops_info = result
            runs.append(result)
            print(f"round {round_} {impl:14s} s/iter={statistics.median(result['s_per_iter_samples']):8.3f} "
                  f"peak={result['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
            report(sweep=[], final=False)  # after every run: a time limit or a failing worker keeps what ran
    sweep = []
    sweep_steps = [int(s) for s in args.sweep_steps.split(",") if s]
    sweep_images = [int(s) for s in args.sweep_images.split(",") if s]
    for impl in [i for i in ("baseline_sdpa", "fastfair") if i in impls] if sweep_steps or sweep_images else ():
        # the main table's point where it was measured as the sweep's are (whole batch, not micro-batches)
        sweep += [{k: r[k] for k in SWEEP_KEYS} for r in runs[:len(impls)]
                  if r["impl"] == impl and r["micro_batch"] == args.images]
        for steps, images in [(s, args.images) for s in sweep_steps] + [(args.steps, n) for n in sweep_images]:
            if any((r["impl"], r["steps"], r["images"]) == (impl, steps, images) for r in sweep):
                continue
            r = run_worker(dict(base, impl=impl, steps=steps, images=images, iters=0, micro_batch=None))
            sweep.append({k: r[k] for k in SWEEP_KEYS})
            print(f"sweep {impl:14s} images={images} steps={steps} peak={r['peak_bytes'] / 2**20:.1f} MiB", flush=True)
            report(sweep=sorted(sweep, key=sweep_order), final=False)  # a time limit keeps the points measured
    report(sweep=sorted(sweep, key=sweep_order), final=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    with sigterm_as_exit():  # gpu_check.sh's time limit: the model folder in /tmp and a stopped write are removed
        main()
