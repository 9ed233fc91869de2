"""The fairness finetuning loop (seed paragraphs 0119-0123, 0129-0134).

One iteration, on each rank for its share of the global batch of N images of one prompt:

    prompt            <- the prompt mixture (the same draw on every rank)
    z_T, S            <- N noises (this rank's rows) and the step count, both a function of (seed, iteration)
    originals         <- frozen model sample from z_T, no grad
    images            <- finetuned model sample from z_T with fastfair.dft.sample (the adjusted gradient);
                         text-only targets share the U-Net calls with the originals
    faces, probs      <- largest face of each image, classifier probabilities of its crop
    q                 <- expected-OT targets over the global batch (fastfair.losses.global_batch)
    loss              <- L_align + lambda_img L_img + lambda_face L_face (fastfair.losses.weights)
    backward (of the loss times the loss scale, fp16), all-reduce grads, unscale, skip the step if any is
                         non-finite, clip, optimizer step, EMA

Launch: plain ``python fastfair/train.py`` (fastfair.process_group sets up a 1-process group: nccl on CUDA, gloo
on CPU), or ``torchrun``. The judging models, the EMA and the optimizer are built by fastfair.judges,
fastfair.ema and fastfair.optimizer.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml

from fastfair import checkpoint
from fastfair.cli import whole_number
from fastfair.config import (ConfigError, TrainConfig, check_files, check_hooks, check_packages, config_to_dict,
                             config_yaml, describe_changes, load_config, repeated_override, resume_changes,
                             save_config, validate)
from fastfair.dft import sample
from fastfair.ema import EMA
from fastfair.finetune import FinetunedModel
from fastfair.judges import build_judges, head_disagreements
from fastfair.models import (
    LatentDecoder, latent_size, load_stable_diffusion, sampling_configs, torch_dtype, vae_factor,
)
from fastfair.optimizer import build_optimizer, optimizer_state_bytes, saved_optimizer_name
from fastfair.preflight import DEFAULT_ITERATIONS as DEFAULT_CHECK_ITERATIONS
from fastfair.preflight import Preflight, free_bytes, retention, saved_steps, tensor_bytes
from fastfair.process_group import OtherRankFailed, on_every_rank, process_group
from fastfair.prompts import build_prompt_mixture
from fastfair.run_control import (StopSignals, cannot_write, closing, isatty, noticing_ctrl_c, progress_options,
                                  stop_signals)
from fastfair.run_log import RunLog, image_file, last_logged_step, naming_errors


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Builds everything a config names and runs `train()`; `iteration(it)` is one step of the loop."""

    def __init__(self, cfg: TrainConfig, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # what each rank reads from its own disk and installation: a file or package missing on one node
        on_every_rank(self.world, "could not start", self._build)
        self.engine = None  # DeepSpeed: reduces, scales, clips and steps the trainable parameters (fastfair.zero)
        if cfg.deepspeed.config:
            from fastfair import zero
            from fastfair.config import deepspeed_config

            self.engine = zero.deepspeed_engine(deepspeed_config(cfg, self.world), self.model.trainable,
                                                self.optimizer, self.lr_scheduler)
        self.ema = EMA(self.model.trainable, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        # fp16 gradients need loss scaling (DeepSpeed scales its own): a gradient below 2^-24 is zero in fp16. Also
        # fp16 frozen weights without fp16 autocast: the gradient flows back through their fp16 activations
        self.scaler = None
        fp16 = "fp16" in (cfg.precision.mixed, cfg.model.dtype)
        if fp16 and self.engine is None and cfg.precision.loss_scale is not None:
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.precision.loss_scale)
        # iterations before start; of them, those whose step was skipped; optimizer steps taken (the EMA's t)
        self.start, self.skipped, self.steps_taken = 0, 0, 0
        self._ot_generator = None  # set per iteration (iteration()); None: torch's global generator
        self.resume_hint = "resume=auto"  # how a stopped run is continued, in its caller's terms (the demo's differ)
        from fastfair.memory_budget import MemoryBudget

        budget = cfg.sampler.memory_budget_gb
        # picks keep_graph_steps and keep_attention_steps per batch shape
        self.memory_budget = MemoryBudget(budget, cfg.sampler.lean_graph) if budget else None

    def _build(self) -> None:
        """What each rank builds from its own disk and installation (checks, models, judges, prompts, optimizer),
        before any collective: `__init__` runs it on every rank together (`on_every_rank`)."""
        cfg = self.cfg
        problems = []  # settings and files together: one try shows everything to set
        for check in (lambda: validate(cfg, self.world, self.device), lambda: check_files(cfg),
                      lambda: check_packages(cfg), lambda: check_hooks(cfg)):
            try:
                check()
            except ConfigError as error:
                problems.append(str(error))
        if problems:
            raise ConfigError("\n".join(problems))
        if cfg.optim.warmup_steps > cfg.max_steps and self.rank == 0:
            # not refused: a run trained in stages may raise max_steps on a resume
            warnings.warn(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds max_steps={cfg.max_steps}: the "
                          f"learning rate reaches only {cfg.max_steps / (cfg.optim.warmup_steps + 1):.0%} of "
                          f"optim.lr={cfg.optim.lr} by the last iteration; lower optim.warmup_steps or raise "
                          "max_steps", stacklevel=2)
        configs = sampling_configs(cfg.model.pretrained, cfg.model.config)
        if configs is not None:  # from the config files: refused before the model loads
            self._check_sampling(configs.scheduler, configs.vae_factor)
        parts = load_stable_diffusion(cfg.model.pretrained, cfg.model.dtype, cfg.model.attention, self.device,
                                      config=cfg.model.config)
        self.vae, self.scheduler = parts.vae, parts.scheduler
        self.decoder = LatentDecoder(self.vae)  # its images clamped: see _decode
        scale = vae_factor(self.vae.config.block_out_channels)
        if configs is None:
            self._check_sampling(self.scheduler, scale)
        # model.resolution: a square of that side; unset, the U-Net's own size (a [height, width] pair or a side)
        size = (cfg.model.resolution // scale,) * 2 if cfg.model.resolution else latent_size(parts.unet.config)
        self.latent_shape = (parts.unet.config.in_channels, *size)
        # LoRA's random init: the same on every rank and in every run of this seed. Training draws from its own
        # generators; the global ones are seeded too, so a hook drawing from them repeats across runs as it
        # continues across a resume (checkpoints save their states)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                                    cfg.finetune.prefix_tokens, cfg.finetune.lora, cfg.finetune.prefix_init)
        self.judges = build_judges(cfg, self.device)
        if cfg.loss.recompute_judges:
            self._recompute_judges()
        from fastfair.losses import LossWeights
        from fastfair.targets import load_targets

        self.targets = load_targets(cfg.targets)
        self.groups = self.targets.groups()
        self._check_classifier_outputs()
        self.loss_weights = LossWeights(cfg.loss.lambda_img_1, cfg.loss.lambda_img_2, cfg.loss.lambda_img_3,
                                        cfg.loss.lambda_face, cfg.loss.lambda_img_no_face)
        self.mixture = build_prompt_mixture(cfg.data, cfg.seed)
        self.optimizer, self.lr_scheduler = build_optimizer(cfg, self.model.parameters())

    def _check_sampling(self, scheduler, scale: int) -> None:
        """The model's scheduler is one fastfair samples exactly, every step count the run can draw has finite
        solver coefficients and the adjustment sampler.coefficients names, and model.resolution is a multiple of
        the VAE's factor `scale`: refused at start, not at the iteration that first draws it."""
        from fastfair.schedule import scheduler_config, solver_schedule

        resolution = self.cfg.model.resolution
        if resolution and resolution % scale:  # decoded images would be silently smaller
            below = max(scale, resolution // scale * scale)
            raise ValueError(f"model.resolution={resolution} is not a multiple of the VAE's factor {scale}: "
                             f"use e.g. {below} or {below + scale}")
        s = self.cfg.sampler
        try:  # the options of the model's own scheduler, whatever the step count
            scheduler_config(scheduler)
        except ValueError as error:
            raise ValueError(f"model.pretrained={self.cfg.model.pretrained}: its scheduler/scheduler_config.json, "
                             f"loaded as a DPMSolverMultistepScheduler: {error}") from None
        key, counts = "sampler.num_steps", [s.num_steps]
        if s.num_steps_range:
            key, counts = "sampler.num_steps_range", range(s.num_steps_range[0], s.num_steps_range[1] + 1)
        for count in counts:
            try:
                solver_schedule(scheduler, count).adjustment(s.coefficients)
            except ValueError as error:
                raise ValueError(f"{key}: {error}") from None

    @torch.no_grad()
    def _check_classifier_outputs(self) -> None:
        """Fail at start, not at the first iteration, when a classifier has fewer outputs than the targets read."""
        outputs = {}
        noise = torch.Generator().manual_seed(0)  # its own: the run's random state is not touched
        for attribute, classifier in self.judges.classifiers.items():
            side = classifier.input_size
            images = torch.rand(4, 3, side, side, generator=noise).mul(2).sub(1).to(self.device)
            with self._autocast():  # as the losses call it (its weights are in the half dtype then)
                output = classifier(images)
            if not torch.is_tensor(output):
                raise ValueError(f"classifiers: the classifier of {attribute!r} returned a {type(output).__name__}: "
                                 "expected logits, a tensor [N, C] for images [N, 3, S, S]")
            outputs[attribute] = output.float().cpu()
        try:
            logits = self.targets.attribute_logits(outputs)
        except KeyError as error:
            raise ValueError(f"classifiers: no classifier gives the target attribute {error}") from None
        except ValueError as error:
            raise ValueError(f"classifiers: {error}; check the classifier file against the targets' indices") from None
        # probabilities, softmaxed again by the losses, flatten every confidence (0.99 read as 0.61): no run trains
        # as meant on them
        given = [name for name, values in logits.items() if values.shape[-1] > 1 and bool(
            (values >= 0).all() and (values <= 1).all() and (values.sum(-1) - 1).abs().max() < 1e-3)]
        if given:
            raise ValueError(f"classifiers: the outputs for {', '.join(given)} are probabilities (in [0, 1], summing "
                             "to 1 on random images); the losses take logits (or log-probabilities): return those "
                             "from the classifier (no softmax at its end)")
        # also where the config declares the layout: a file that names its classes (e.g. one trained by an older
        # fastfair, whose race order differed) must not be read under other names
        problems = [p for a in self.targets.attributes
                    for p in head_disagreements(a, getattr(self.judges.classifiers[a.name], "head", None))]
        if problems:
            raise ValueError("targets disagree with the classifier files, which name their outputs: "
                             + "; ".join(problems))

    def _autocast(self):
        mixed = self.cfg.precision.mixed
        if mixed == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch_dtype(mixed))

    # --- randomness: a pure function of (seed, iteration), identical on every rank and after a resume
    def _noise_and_steps(self, it: int):
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + it)
        n = self.cfg.batch.images_per_prompt
        z_T = torch.randn((n,) + self.latent_shape, generator=generator)
        per_rank = self.cfg.batch.per_rank(self.world)
        z_T = z_T[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.device)
        return z_T, self._steps(it), generator

    def _steps(self, it: int) -> int:
        """The sampling step count of iteration `it`: sampler.num_steps, or drawn from num_steps_range."""
        low, high = self.cfg.sampler.num_steps_range or (self.cfg.sampler.num_steps,) * 2
        return int(np.random.default_rng([self.cfg.seed, 2, it]).integers(low, high + 1))

    def _recompute_judges(self) -> None:
        """loss.recompute_judges: the decoder block-wise and each judge on its own keep only their inputs; their
        activations are rebuilt in the backward (fastfair.recompute). With loss.judge_images each runs in slices
        of that many images, a checkpoint each (the decoder's rebuild still block-wise)."""
        from fastfair.recompute import recompute_judges

        j = self.judges
        judges = {**{f"classifier/{name}": c for name, c in j.classifiers.items()}, "face": j.face_embedder}
        self.decoder, j.semantics, wrapped = recompute_judges(self.decoder, j.semantics, judges,
                                                              self.cfg.loss.judge_images)
        j.classifiers = {name: wrapped[f"classifier/{name}"] for name in j.classifiers}
        j.face_embedder = wrapped["face"]

    def _sample(self, unet, z_T, cond, uncond, steps, generator, frozen_rows=0):
        s = self.cfg.sampler
        keep, keep_attention = s.keep_graph_steps, s.keep_attention_steps
        if self.memory_budget is not None and torch.is_grad_enabled():  # only the graph-building pass
            # the optimizer state: made at the first step; from then on CUDA's allocated memory holds it, the
            # CPU's count (none) does not
            counted = bool(self.optimizer.state) and z_T.device.type == "cuda"
            pending = 0 if counted else optimizer_state_bytes(self.cfg.optim.name, self.model.parameters(),
                                                              self.engine is not None, self._zero_ranks())
            keep, keep_attention = self.memory_budget.keeps(unet, z_T, cond, uncond, steps, s.guidance_scale,
                                                            frozen_rows, pending_bytes=pending,
                                                            grad_steps=s.grad_steps)
        return sample(unet, self.scheduler, z_T, cond, uncond, num_steps=steps, guidance_scale=s.guidance_scale,
                      coefficients=s.coefficients, recompute_chunk=s.recompute_chunk,
                      recompute_images=s.recompute_images, keep_graph_steps=keep,
                      keep_attention_steps=keep_attention,
                      grad_steps=s.grad_steps, generator=generator, frozen_rows=frozen_rows,
                      lean_graph=s.lean_graph)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] in [-1, 1] from latents: clamped as a saved image is (the public code clamps too),
        so the losses judge the picture evaluation scores; the decoder's overshoot past the range would otherwise
        be a channel the classifier reads in training and that saving erases."""
        return self.decoder(z)

    def generate_pair(self, prompt: str, z_T, steps, generator):
        """(originals, images) [n, 3, H, W] from the same noise; only `images` carries a graph."""
        m, n = self.model, z_T.shape[0]
        cond_orig, uncond_orig = m.encode_original([prompt]), m.encode_original([""])
        cond, uncond = m.encode([prompt]), m.encode([""], positive=False)
        if not m.trains_unet:  # same U-Net: both halves in the same calls; the original half is not recomputed
            both = lambda a, b: torch.cat([a.expand(n, -1, -1), b.expand(n, -1, -1)])  # noqa: E731
            z0 = self._sample(m.unet, torch.cat([z_T, z_T]), both(cond_orig, cond), both(uncond_orig, uncond),
                              steps, generator, frozen_rows=n)
            z0_orig, z0 = z0[:n].detach(), z0[n:]
        else:
            with m.original_unet() as frozen, torch.no_grad():
                z0_orig = self._sample(frozen, z_T, cond_orig, uncond_orig, steps, generator)
            z0 = self._sample(m.unet, z_T, cond, uncond, steps, generator)
        with torch.no_grad():
            originals = self._decode(z0_orig)
        return originals, self._decode(z0)

    def _attribute_logits(self, images, regions) -> dict:
        from fastfair.faces import crop_boxes

        logits, cache = {}, {}
        for name, classifier in self.judges.classifiers.items():
            if id(classifier) not in cache:
                # the boxes as found (float64): rounded to bf16 images' dtype they moved by up to 1.7 pixels
                crops = crop_boxes(images, regions.crop_boxes.to(images.device), classifier.input_size,
                                   antialias=getattr(classifier, "antialias", True))
                cache[id(classifier)] = classifier(crops).float()
            logits[name] = cache[id(classifier)]
        return self.targets.attribute_logits(logits)

    def losses(self, originals: torch.Tensor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The combined loss and its parts (fastfair.losses.weights.combine_losses) for this rank's images."""
        from fastfair.faces import align_faces, locate_faces
        from fastfair.losses import face_box_mask, scale_gradient, semantic_weights, target_disagreement
        from fastfair.losses.face import face_realism_loss

        margin = self.cfg.faces.margin
        with torch.no_grad():
            regions_orig = locate_faces(originals.clamp(-1, 1), self.judges.detector, margin)
            orig_logits = self._attribute_logits(originals, regions_orig)
        regions = locate_faces(images.detach().clamp(-1, 1), self.judges.detector, margin)
        logits = self._attribute_logits(images, regions)
        align, target_classes, use_original = self._alignment(logits, regions.found, orig_logits, regions_orig.found)
        original_classes = {name: value.argmax(-1) for name, value in orig_logits.items()}
        differs = target_disagreement(target_classes, original_classes, regions_orig.found)
        # lambda_img_3's face region is the one the classifier judges (seed 0108-0109: one region d_face(x)), the
        # crop box with its margin: with the bare detector box the rim the classifier also sees (hair, jaw) would
        # resist the change at lambda_img_2
        mask = face_box_mask(regions.crop_boxes, images.shape[-2], images.shape[-1], regions.found)
        image_weight, pixel_map = semantic_weights(differs, regions.found, mask, self.loss_weights)
        with torch.no_grad():
            original_embeddings = self.judges.semantics.embed_originals(originals)
        semantics = self.judges.semantics(scale_gradient(images, pixel_map), original_embeddings)
        face = images.new_zeros(images.shape[0])
        if self.judges.face_embedder is not None:
            embed, size = self.judges.face_embedder, self.judges.face_embedder.input_size
            with torch.no_grad():
                orig_faces = embed(align_faces(originals, regions_orig.landmarks.to(originals.device), size))
            faces = embed(align_faces(images, regions.landmarks.to(images.device), size))
            face = face_realism_loss(faces, self.judges.face_bank, orig_faces, use_original) * regions.found
        from fastfair.losses import combine_losses

        return {**combine_losses(align, semantics, face, image_weight, self.loss_weights),
                **self._batch_statistics(logits, regions.found)}

    def _alignment(self, logits: dict, found: torch.Tensor, orig_logits: dict, orig_found: torch.Tensor):
        """Per target group (joint cells or one attribute): the expected-OT targets q over the global batch
        (seed Eq. 5) and the alignment loss (Eq. 6). Returns (align [N], {attribute: target class [N]}, use_original
        [N]: the images whose face loss targets the original's own face, which already shows every target class
        with at least loss.original_face_confidence)."""
        from fastfair.losses import alignment_loss, global_expected_ot_targets
        from fastfair.losses.alignment import target_cells
        from fastfair.losses.face import original_shows_targets

        align = found.new_zeros(found.shape, dtype=torch.float32)
        keep_confidence = self.cfg.loss.original_face_confidence
        target_classes = {}
        use_original = found & orig_found & (keep_confidence is not None)
        for group in self.groups:
            log_p = group.log_probs(logits)
            # a diverged step's images (non-finite probabilities) take no part in the targets: their loss is NaN,
            # and the step is skipped (a whole-image detector finds a face even in them)
            valid = found & torch.isfinite(log_p.detach()).all(-1)
            # in log_p's dtype: the alignment loss and the target cells then see the same rows as tied
            q = global_expected_ot_targets(log_p.detach().exp().double(), group.target, valid=valid,
                                           num_samples=self.cfg.loss.ot_samples, generator=self._ot_generator).to(log_p)
            align = align + alignment_loss(log_p, q, self.cfg.loss.confidence_threshold, mask=found, reduction="none")
            original_cells = group.log_probs(orig_logits).argmax(-1)
            original_cells = torch.where(orig_found.to(original_cells.device), original_cells, -1)
            # a joint group's tied row whose maxima lack the original's cell has no cell: no class in any attribute
            group_classes = group.attribute_classes(target_cells(q, original_cells))
            target_classes.update(group_classes)
            if keep_confidence is not None:
                use_original &= original_shows_targets(orig_logits, group_classes, keep_confidence)
        return align, target_classes, use_original

    @torch.no_grad()
    def _batch_statistics(self, logits: dict, found: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Class frequencies and bias (seed 0124) of the global batch's finetuned images, per attribute, for
        logging (keys with a '/', kept off the progress bar); images without a face are left out."""
        from fastfair.losses.global_batch import gather_rows
        from fastfair.metrics import bias, class_frequencies

        stats = {}
        for a in self.targets.attributes:
            labels = torch.where(found, logits[a.name].argmax(-1), torch.full_like(found, -1, dtype=torch.long))
            labels = gather_rows(labels)[0] if self.world > 1 else labels
            freqs = class_frequencies(labels.cpu().numpy(), len(a.classes)).freqs
            if len(a.classes) > 1:
                stats[f"bias/{a.name}"] = torch.tensor(bias(freqs))
            stats.update({f"freq/{a.name}/{c}": torch.tensor(f) for c, f in zip(a.classes, freqs)})
        return stats

    def _deepspeed_step(self, loss: torch.Tensor, it: int) -> None:
        """engine.backward + engine.step; a non-finite loss on any rank, or an fp16 overflow (DeepSpeed's loss
        scaler skips that step itself), counts as a skipped step."""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            self.skipped += 1
            return
        skipped_before = self.engine.skipped_steps
        self.engine.backward(loss)
        if not hasattr(self.engine.optimizer, "overflow"):
            # the torch optimizer itself (ZeRO stage 0 without fp16/bf16): nothing of DeepSpeed's checks the
            # gradients, so a non-finite one would be applied (NaN weights and EMA)
            finite = torch.tensor([float(_finite_gradients(self.model.parameters()))], device=loss.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                self.engine.zero_grad()
                self.skipped += 1
                return
        self.engine.step()
        if self.engine.skipped_steps == skipped_before:
            self._step_taken()
        else:
            self.skipped += 1

    def _backward_and_reduce(self, loss: torch.Tensor) -> bool:
        """Backward (of the scaled loss, with a loss scaler), then average gradients over ranks and unscale them;
        True when all of them are finite (step may be taken)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        params = self.model.parameters()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.world > 1:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        if self.scaler is not None:  # the same reduced gradients on every rank: the same decision everywhere
            self.scaler.unscale_(self.optimizer)
        return _finite_gradients(params)

    def _optimizer_step(self, finite: bool) -> None:
        """With a loss scaler its step (skipped on non-finite gradients) and its update: the scale backs off after
        an overflow and grows after a run of finite steps."""
        if self.scaler is None:
            if finite:
                self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _step_taken(self) -> None:
        """Counts an optimizer step taken and moves the EMA at its step count (skipped steps do not count)."""
        self.steps_taken += 1
        self.ema.update(self.model.trainable, self.steps_taken)

    def iteration(self, it: int) -> Dict[str, float]:
        """One optimization step (module docstring); returns the loss parts as floats. `it` counts the iterations
        before it (train() calls it = start, start + 1, ...): the noise and the sampler's step count are functions of
        it."""
        _, prompt = self.mixture.draw()
        z_T, steps, generator = self._noise_and_steps(it)
        # the Monte Carlo transport targets' draws (K > 2): their own stream, so that no other use of torch's
        # global generator (a library's, or a probe run once per process) can make a resumed run differ
        self._ot_generator = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.seed, 3, it])
                                                               .integers(2**63)))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            originals, images = self.generate_pair(prompt, z_T, steps, generator)
            parts = self.losses(originals, images)
        if self.engine is not None:
            self._deepspeed_step(parts["loss"], it)
        else:
            finite = self._backward_and_reduce(parts["loss"])
            if finite and self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self._optimizer_step(finite)
            if finite:
                self.lr_scheduler.step()
                self._step_taken()
            else:
                self.skipped += 1
        self.last_images = (originals.detach(), images.detach())
        values = {name: value.detach().float().reshape(()) for name, value in parts.items()}
        if self.world > 1:  # the loss parts are this rank's share of the batch (equal shares): log their mean
            # 'bias/..', 'freq/..' are the global batch's already; 'img/<encoder>' are this rank's too
            local = [name for name in values if not name.startswith(("bias/", "freq/"))]
            mean = torch.stack([values[name] for name in local])
            dist.all_reduce(mean)
            values.update(zip(local, mean / self.world))
        return {name: float(value) for name, value in values.items()}

    # --- checkpoints
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.engine is None else None,
                "optimizer_name": self.cfg.optim.name, "lr_scheduler": self.lr_scheduler.state_dict(),
                "mixture": self.mixture.state_dict(), "skipped": self.skipped, "steps_taken": self.steps_taken,
                "loss_scaler": None if self.scaler is None else self.scaler.state_dict(),
                "memory_plans": None if self.memory_budget is None else self.memory_budget.state_dict()}

    def _saved(self) -> Tuple[Dict[str, torch.Tensor], dict]:
        """(weights, state) as a checkpoint holds them now (the EMA beside them). A collective under DeepSpeed:
        every rank's ZeRO partition of the optimizer state is gathered on rank 0 (``zero_shards``)."""
        shards = None
        if self.engine is not None:
            from fastfair import zero

            shards = zero.gather_optimizer_shards(self.engine)
        weights = {name: p.detach() for name, p in self.model.trainable.items()}
        return weights, self.state() if shards is None else {**self.state(), "zero_shards": shards}

    def save(self, it: int) -> None:
        weights, state = self._saved()  # every rank: the gather is a collective

        def written() -> None:
            if self.rank == 0:
                checkpoint.save_checkpoint(self.cfg.output_dir, it, weights, self.ema.shadow, state,
                                           self.cfg.keep_last, self.cfg.keep_every, config=config_to_dict(self.cfg))

        # rank 0 writes (a full disk fails there alone); the others wait for its outcome, which is the barrier
        on_every_rank(self.world, "could not save the checkpoint", written)

    def resume(self, path) -> None:
        if self.engine is not None:
            from fastfair import zero

            zero.allow_deepspeed_state_in_weights_only_load()
        weights, ema, state = checkpoint.load_checkpoint(path)
        if self.rank == 0:
            _warn_version_changes(path, state.get("versions"))
        weights = checkpoint.for_model(weights, self.model.trainable, f"resume={path}")
        ema = checkpoint.for_model(ema, self.model.trainable, f"resume={path}")
        if self.engine is None and state["optimizer"] is None:
            raise ValueError(f"resume={path}: a checkpoint of a DeepSpeed run; resume it with its deepspeed.config")
        saved_name = state.get("optimizer_name") or saved_optimizer_name(state["optimizer"])
        if saved_name not in (None, self.cfg.optim.name):  # their states differ in layout (exp_avg vs state1)
            raise ValueError(f"optim.name={self.cfg.optim.name}, but resume={path} holds an {saved_name} optimizer "
                             f"state: resume with optim.name={saved_name}, or start a fresh run in another output_dir")
        if self.engine is not None and "zero_shards" not in state:
            raise ValueError(f"resume={path}: a checkpoint of a run without DeepSpeed; resume it without "
                             "deepspeed.config")
        saved_settings = self._check_resumed_settings(path)
        with torch.no_grad():
            for name, p in self.model.trainable.items():
                p.copy_(weights[name])
                self.ema.shadow[name].copy_(ema[name])
        if self.engine is not None:
            zero.load_optimizer_shard(self.engine, state["zero_shards"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("loss_scaler"):  # older checkpoints: the scaler starts afresh
            self.scaler.load_state_dict(state["loss_scaler"])
        self._apply_optim_settings()
        try:
            self.mixture.load_state_dict(state["mixture"])
        except ValueError as error:
            shipped = [name for name in self.mixture.changed_sets(state["mixture"])
                       if not (self.cfg.data.sets[name].file or self.cfg.data.sets[name].factory)]
            if not shipped:
                raise
            raise ValueError(f"{error}. data.sets.{shipped[0]} is a list shipped with fastfair, which changed on "
                             "2026-11-30, 2026-12-02 and 2026-12-03 (held-out test items, their agent nouns and "
                             "near-synonyms, or compounds holding them, "
                             "were replaced in the training lists): a run started before resumes with its list saved "
                             "as a file (git show <earlier fastfair>:fastfair/data/prompts/"
                             f"{shipped[0]}_{self.cfg.data.split}.txt) and given as "
                             f"data.sets.{shipped[0]}.file, with resume_allow=[data.sets]") from None
        if self.memory_budget is not None:  # older checkpoints: planned afresh
            self.memory_budget.load_state_dict(state.get("memory_plans"))
        self.start, self.skipped = int(state["iteration"]), int(state["skipped"])
        # checkpoints before it was saved: train() counted every iteration not skipped
        self.steps_taken = int(state.get("steps_taken", self.start - self.skipped))
        checkpoint.set_rng_state(state["rng"])
        self._warn_ema_change(path, saved_settings)

    def _warn_ema_change(self, path: Path, saved: dict) -> None:
        """A run trained before the EMA's warm-up (saved: its recorded settings), resumed to train on: from here its
        EMA warms up (at its step count: a lower decay than it had) unless optim.ema_warmup=false keeps it."""
        o = self.cfg.optim
        if self.rank != 0 or self.start >= self.cfg.max_steps or not (o.ema_warmup and o.ema_decay > 0):
            return
        saved_optim = saved.get("optim") or {}
        if "ema_warmup" not in saved_optim:
            before = f", optim.ema_decay={saved_optim['ema_decay']}" if "ema_decay" in saved_optim else ""
            warnings.warn(f"resume={path} was trained by a fastfair whose EMA had no warm-up (before 2026-11-30"
                          f"{before}): from here its EMA uses optim.ema_decay={o.ema_decay} with the warm-up "
                          "(optim.ema_warmup=true). To continue it as it was: optim.ema_warmup=false and its "
                          "ema_decay", stacklevel=3)

    def _check_resumed_settings(self, path: Path) -> dict:
        """A resume continues the same run: refuse settings that differ from those the checkpoint was trained with
        (checkpoint.config_file), except the ones a resume may change (fastfair.config.RESUME_MAY_CHANGE) and
        resume_allow. Returns those settings."""
        saved = checkpoint.trained_settings(path)
        if saved is None:  # nothing to check the resume against: it could continue the run with other settings
            raise ValueError(f"resume={path}: no record of the settings it was trained with (neither "
                             f"{path / checkpoint.CONFIG_FILE} nor the run's {checkpoint.config_file(path)}); restore "
                             "one from a copy, or write it with python fastfair/train.py --print-config and the "
                             "settings the run was started with")
        changes = resume_changes(saved, self.cfg)
        horizon = saved.get("max_steps")
        if horizon not in (None, self.cfg.max_steps) and self.cfg.optim.scheduler != "constant" and self.rank == 0:
            # max_steps is the learning-rate schedule's horizon: a run stopped by max_steps is not paused
            warnings.warn(f"max_steps={self.cfg.max_steps}, but resume={path} was trained toward max_steps={horizon}: "
                          f"the {self.cfg.optim.scheduler} learning-rate schedule now decays toward step "
                          f"{self.cfg.max_steps}, so from here the run differs from one started with it", stacklevel=2)
        if changes:
            listed, keys = describe_changes(changes), ",".join(changes)
            raise ValueError(f"resume={path}: this run changes settings the checkpoint was trained with: {listed}. "
                             "A resume continues the same run: set them back; to change them on purpose, add "
                             f"resume_allow=[{keys}]; or start a fresh run in another output_dir")
        return saved

    def _apply_optim_settings(self) -> None:
        """After a resume, the run's optim settings (lr, betas, weight_decay, eps: what config.yaml records) over
        those saved in the optimizer state, as the LR schedule (rebuilt from the config) already is. Unchanged
        settings give the saved values bit for bit: the same float arithmetic LambdaLR does."""
        o, schedule = self.cfg.optim, self.lr_scheduler
        schedule.base_lrs = [o.lr] * len(schedule.base_lrs)
        for group, factor in zip(self.optimizer.param_groups, schedule.lr_lambdas):
            group.update(initial_lr=o.lr, lr=o.lr * factor(schedule.last_epoch), betas=tuple(o.betas),
                         weight_decay=o.weight_decay, eps=o.eps)
        schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _resume_on_every_rank(self) -> Optional[Path]:
        """Resolve `resume` and resume from it (None: a fresh start). Under several processes a rank that fails (a
        node-local prompt file that differs from the saved list) makes every rank raise (`on_every_rank`)."""
        def resumed() -> Optional[Path]:
            path = checkpoint.resolve_resume(self.cfg.resume, self.cfg.output_dir)
            if path is not None:
                self.resume(path)
            return path

        return on_every_rank(self.world, "could not resume", resumed)

    def _check_ranks_agree(self, path: Optional[Path]) -> None:
        """Every rank resumes from the same checkpoint: each resolves resume=auto in its own view of output_dir, and
        on a node-local disk another node sees other checkpoints (or none): the collectives would still pair up and
        rank 0 would save averages of other steps' gradients, unseen."""
        if self.world == 1:
            return
        mixture = self.mixture.state_dict()
        mine = (self.start, "" if path is None else Path(path).name,
                (tuple(mixture["order"]), tuple(sorted(mixture["prompts"].items()))))
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        if len({(start, name) for start, name, _ in every}) > 1:
            seen = ", ".join(f"rank {rank}: {name or 'a fresh start'}" for rank, (_, name, _) in enumerate(every))
            raise ValueError(f"the ranks resume from different checkpoints ({seen}): output_dir={self.cfg.output_dir} "
                             "must be storage every rank shares (each node's own disk holds other checkpoints)")
        # every rank draws the same prompt each iteration only from the same prompts in the same order: a factory
        # listing a set (Python's hash order differs per process) or a node-local file would train each rank on
        # other prompts, their gradients averaged, unseen
        order, prompts = every[0][2][0], dict(every[0][2][1])
        for rank, (_, _, (other_order, other_prompts)) in enumerate(every[1:], start=1):
            differ = sorted(name for name, crc in other_prompts if prompts.get(name) != crc)
            if differ or other_order != order:
                what = f"data.sets.{differ[0]}'s prompts" if differ else "the order of data.sets"
                raise ValueError(f"rank {rank} and rank 0 differ in {what}: every rank must read the same prompts in "
                                 "the same order (a prompt-set factory must return them in a fixed order, not from a "
                                 "set; a prompt file must be the same on every node)")

    def _check_output_dir(self, resumed: Optional[Path]) -> None:
        """Nothing already saved is lost: a run starting at step self.start (from the checkpoint `resumed`, None:
        afresh) refuses an output_dir holding checkpoints past it, which it would mix with its own (retention keeps
        the highest steps: it would prune its own new checkpoints, and resume=auto would later pick the other
        run's); one resuming a checkpoint from elsewhere refuses an output_dir holding any checkpoint or log (another
        run's: retention would delete them, the log would run on from its lines); a fresh one refuses the log of a
        run whose checkpoints were moved away (`_check_log_of_moved_run`)."""
        # every step folder counts, complete or not (weights-only ones whose state.pt was deleted to save space,
        # ones that lost a file): a run would overwrite them
        saved = checkpoint.step_folders(self.cfg.output_dir)
        if resumed is not None and Path(resumed).resolve().parent != \
                checkpoint.checkpoint_dir(self.cfg.output_dir).resolve():
            logged = last_logged_step(self.cfg.output_dir)
            if saved or logged is not None:
                listed = ", ".join(map(str, list(saved)[:8])) + (", ..." if len(saved) > 8 else "")
                held = (f"checkpoints (steps {listed})" if saved else
                        f"the log of a run (metrics.jsonl, to step {logged})")
                raise ValueError(f"output_dir={self.cfg.output_dir} holds {held}, and this run resumes from "
                                 f"resume={resumed}, a checkpoint of another folder: it would mix the two runs (and "
                                 "its retention delete those checkpoints); resume into an empty output_dir, or move "
                                 "them away")
        if resumed is None and not saved:
            self._check_log_of_moved_run()
        later = [step for step in saved if step > self.start]
        if not later:
            return
        steps = ", ".join(f"{step}" if checkpoint.has_weights(saved[step]) else f"{step} (incomplete)"
                          for step in later[:8])
        steps += ", ..." if len(later) > 8 else ""
        if resumed is not None:
            if not any(checkpoint.is_resumable(saved[step]) for step in later):  # resume=auto passed over them
                self._refuse_unresumable({step: saved[step] for step in later})
            newest = "resume=auto continues from the newest; " if checkpoint.is_resumable(saved[max(later)]) else ""
            raise ValueError(f"output_dir={self.cfg.output_dir} holds checkpoints newer than the step {self.start} "
                             f"this run resumes from (steps {steps}), which it would overwrite: {newest}to go back "
                             "on purpose, move or delete the newer ones")
        how = ("continue it with resume=auto, or" if any(map(checkpoint.is_resumable, saved.values())) else
               "none of its checkpoints can be resumed (each lacks state.pt or a weight file):")
        raise ValueError(f"output_dir={self.cfg.output_dir} holds checkpoints of another run (steps {steps}), which "
                         f"a fresh run (resume='') would overwrite and mix with its own: {how} use another "
                         "output_dir, or move those checkpoints away")

    def _check_log_of_moved_run(self) -> None:
        """A fresh run rewrites output_dir's log and image grids, rightly where an earlier run there stopped before
        its first checkpoint (its rerun starts afresh); refused where that run's log goes past its first
        checkpoint step, so it had checkpoints that were moved or deleted (after an export, say): its log is
        all that is left of it."""
        logged = last_logged_step(self.cfg.output_dir)
        if logged is None:
            return
        earlier = {}
        with contextlib.suppress(OSError, ValueError, yaml.YAMLError):  # unreadable: judged by this run's settings
            earlier = yaml.safe_load((Path(self.cfg.output_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
        earlier = earlier if isinstance(earlier, dict) else {}
        every, last = (earlier.get(key, getattr(self.cfg, key)) for key in ("checkpoint_every", "max_steps"))
        first = min(every, last) if isinstance(every, int) and isinstance(last, int) else self.cfg.checkpoint_every
        if logged > first:  # it went on past a checkpoint it must have written (saves finish before training goes on)
            raise ValueError(f"output_dir={self.cfg.output_dir} holds the log of a run that reached step {logged} "
                             f"(metrics.jsonl), past its first checkpoint at step {first}, but no checkpoint: they "
                             "were moved or deleted, and a fresh run would replace its log and image grids; use "
                             f"another output_dir, or delete {Path(self.cfg.output_dir) / 'metrics.jsonl'} (and "
                             "images/) to start afresh here")

    def _refuse_unresumable(self, later: Dict[int, Path]) -> None:
        """The refusal where every checkpoint past the resumed step lacks a file a resume needs (state.pt, deleted to
        save space, or a weight file): resume=auto passed over them, and this run would overwrite them."""
        lacking = "; ".join(f"{folder.name} lacks {', '.join(checkpoint.missing_files(folder))}"
                            for folder in list(later.values())[:8]) + ("; ..." if len(later) > 8 else "")
        keep = next((folder for folder in later.values() if checkpoint.has_weights(folder)), None)
        export = f" (its weights still export: python -m fastfair.export {keep} --out DIR)" if keep else ""
        raise ValueError(f"output_dir={self.cfg.output_dir} holds checkpoints newer than the step {self.start} this "
                         f"run resumes from that cannot be resumed ({lacking}), and training on would overwrite "
                         f"them: move them out of {checkpoint.checkpoint_dir(self.cfg.output_dir)}{export} or delete "
                         f"them, then the run continues from step {self.start}")

    def _claim_output_dir(self, held: contextlib.ExitStack) -> Optional[str]:
        """Rank 0 takes output_dir's lock (checkpoint.output_dir_lock), held until `held` closes: another run
        there is refused now, naming its holder. Also checks that the run can write where it will (output_dir,
        its checkpoints/, logging.tensorboard_dir), so that a read-only folder is named at the start, not at the
        first checkpoint. Returns the message for a folder it cannot write in (None: all can be), which the
        caller raises once there are steps to train (a finished run in a read-only folder still says so). Every
        rank gets rank 0's outcome (the others would wait for it in their first collective): its error on rank 0,
        an OtherRankFailed naming it on the others."""
        failure, unwritable = None, None
        if self.rank == 0:
            out = Path(self.cfg.output_dir)
            tensorboard = self.cfg.logging.tensorboard_dir
            try:
                unwritable = cannot_write(out, f"output_dir={out}", "output_dir")
                if unwritable is None:  # no lock file in a folder no run can write in: nothing to guard
                    held.enter_context(checkpoint.output_dir_lock(out))
                    unwritable = cannot_write(checkpoint.checkpoint_dir(out), f"output_dir={out}", "output_dir")
                if unwritable is None and tensorboard:
                    unwritable = cannot_write(Path(tensorboard), f"logging.tensorboard_dir={tensorboard}",
                                               "logging.tensorboard_dir (or leave it unset: output_dir/tensorboard)")
            except Exception as error:  # any failure (not only a refusal): the others wait for this broadcast
                if self.world == 1:
                    raise
                failure = error
        if self.world > 1:  # one collective, as on_every_rank's, that also carries unwritable
            shared = [(None if failure is None else f"{type(failure).__name__}: {failure}", unwritable)]
            dist.broadcast_object_list(shared, src=0)
            if failure is not None:
                raise failure
            said, unwritable = shared[0]
            if said is not None:
                raise OtherRankFailed(f"rank 0 could not claim output_dir, so no rank goes on: {said}")
        return unwritable

    def _agreed_stop(self, stop: StopSignals, failed: bool = False) -> Tuple[int, bool]:
        """(the stop signal's number if any rank received one (0: none), whether any rank ``failed``): all ranks
        stop at the same iteration, as each saves its share of a DeepSpeed checkpoint and every collective pairs
        up."""
        if self.world == 1:
            return stop.signum, failed
        flags = torch.tensor([stop.signum, int(failed)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0].item()), bool(flags[1].item())

    def _report(self, it: int, parts: Dict[str, float], bar, log: Optional[RunLog]) -> None:
        """After iteration ``it``: the progress bar, and on rank 0 the logged scalars and image grids when due."""
        cfg = self.cfg
        # shown by update's redraw (when due): a redraw per call would write every iteration whatever mininterval
        bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if "/" not in k}, refresh=False)
        bar.update()
        if log is not None and (it + 1) % cfg.logging.log_every == 0:
            log.scalars(it + 1, parts)
        if log is not None and cfg.logging.image_every and (it + 1) % cfg.logging.image_every == 0:
            pixels = grid_pixels(*self.last_images)
            image = image_file(cfg.output_dir, it + 1)
            with naming_errors(image):  # a full disk: named, with the way on
                save_png(pixels, image)
            log.image(it + 1, "originals_over_finetuned", pixels)

    def train(self) -> None:
        """Resume where `resume` says, then train to max_steps, saving every checkpoint_every iterations and at
        the end. Rank 0 holds output_dir's lock throughout (a second run there is refused at start). SIGTERM or
        SIGUSR1 (a Slurm preemption or time limit, --signal=USR1@SECONDS) ends the run after the iteration in
        progress: a checkpoint at the step reached, then SystemExit with status 128 + the signal's number."""
        with contextlib.ExitStack() as held:
            self._begin(self._claim_output_dir(held))
            if self.start == self.cfg.max_steps:  # nothing to train (a rerun of a finished run, or the demo's)
                if self.rank == 0:  # config.yaml keeps what ran: settings given now (optim.lr=...) changed nothing
                    print(f"{self.cfg.output_dir}: trained to step {self.start} already, nothing to train")
                return
            self._train(held)

    def _begin(self, unwritable: Optional[str]) -> Optional[Path]:
        """Resume where `resume` says and check output_dir against it; returns the checkpoint resumed (None: a
        fresh start). unwritable (`_claim_output_dir`'s): raised where there are steps to train (a finished run in
        a read-only folder still says so)."""
        cfg = self.cfg
        path = self._resume_on_every_rank()
        self.step = self.start  # the iterations done, for an interruption's message (main)
        self._check_ranks_agree(path)
        # each rank looks in its own view of output_dir (a node-local disk may hold another run's checkpoints)
        on_every_rank(self.world, "found output_dir in use", lambda: self._check_output_dir(path))
        if self.start > cfg.max_steps:
            raise ValueError(f"max_steps={cfg.max_steps}, but the run resumed from step {self.start}: raise max_steps "
                             "to train on, or use another output_dir for a shorter run")
        if self.start < cfg.max_steps and unwritable is not None:
            raise OSError(unwritable)
        return path

    def check(self, iterations: int = DEFAULT_CHECK_ITERATIONS) -> Preflight:
        """`train()`'s start (the resume, output_dir and its lock, which a running run there holds) and up to
        `iterations` timed iterations from the step it would start at, saving nothing: no checkpoint, config.yaml,
        log or image (output_dir and its checkpoints/ are made, as the run makes them). The iterations move the
        weights in memory only. Every rank calls it (the iterations' collectives)."""
        cfg = self.cfg
        with contextlib.ExitStack() as held:
            path = self._begin(self._claim_output_dir(held))
            todo = cfg.max_steps - self.start
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds, drawn = [], []
            for it in range(self.start, self.start + min(iterations, todo)):
                began = time.perf_counter()
                self.iteration(it)  # ends reading its losses on the host: the device's work is done
                seconds.append(time.perf_counter() - began)
                drawn.append(self._steps(it))
        saved_bytes, measured = self._checkpoint_bytes()
        cuda = self.device.type == "cuda"
        peak = torch.tensor([_peak_memory_bytes(self.device),
                             torch.cuda.max_memory_reserved(self.device) if cuda else 0],
                            dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        existing = list(checkpoint.list_checkpoints(cfg.output_dir))
        saves = saved_steps(self.start, cfg.max_steps, cfg.checkpoint_every)
        kept, most_held = retention(existing, saves, cfg.keep_last, cfg.keep_every)
        plans = None if self.memory_budget is None else {
            key[1]: keeps for key, keeps in self.memory_budget.state_dict()["plans"].items()}  # by step count
        s = cfg.sampler
        low, high = s.num_steps_range or (s.num_steps, s.num_steps)
        total = torch.cuda.get_device_properties(self.device).total_memory if cuda else None
        return Preflight(output_dir=str(cfg.output_dir), resumes_from=None if path is None else str(path),
                         start=self.start, max_steps=cfg.max_steps, world=self.world,
                         images_per_iteration=cfg.batch.images_per_prompt, steps_range=(low, high),
                         steps_drawn=drawn,
                         trainable_parameters=sum(p.numel() for p in self.model.trainable.values()),
                         iteration_seconds=seconds,
                         peak_memory=int(peak[0]), peak_reserved=int(peak[1]) if cuda else None,
                         device_memory=total, checkpoint_bytes=saved_bytes,
                         optimizer_state_measured=measured, existing_checkpoints=existing, saves=saves, kept=kept,
                         most_held=most_held, free_disk=free_bytes(cfg.output_dir), memory_plans=plans,
                         grad_steps=s.grad_steps)

    def _zero_ranks(self) -> Optional[int]:
        """The ranks ZeRO (stage >= 1) splits the optimizer state over, None where it is not split."""
        if self.engine is None or self.engine.zero_optimization_stage() < 1:
            return None
        return self.world

    def _checkpoint_bytes(self) -> Tuple[int, bool]:
        """(the bytes of the tensors `save` would write now, whether the optimizer state among them is measured):
        before the first step, which makes it, it is estimated. A collective under DeepSpeed, as `save` is."""
        weights, state = self._saved()
        saved = tensor_bytes([weights, self.ema.shadow, state, checkpoint.rng_state()])
        # the moments exist once a step was taken or resumed (ZeRO's shards hold the weights' partitions before)
        measured = self.steps_taken > 0 or self.start > 0
        if not measured:  # DeepSpeed's moments in float32; under ZeRO every rank's partition, gathered
            ranks = self._zero_ranks()
            saved += optimizer_state_bytes(self.cfg.optim.name, weights.values(), self.engine is not None,
                                           ranks) * (ranks or 1)
        return saved, measured

    def _train(self, held: contextlib.ExitStack) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        stop = held.enter_context(stop_signals())

        def opened() -> Optional[RunLog]:  # rank 0 writes; a failure there must stop every rank
            if self.rank != 0:
                return None
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
            return RunLog(cfg.output_dir, cfg.logging.tensorboard_dir, self.start)

        log = on_every_rank(self.world, "could not write the run's config or log", opened)
        if log is not None:
            held.push(closing(log.close))
        # advanced by hand: a bar over the range counts only at its redraws, and a stop's last line said 0/N
        bar = tqdm(initial=self.start, total=cfg.max_steps, disable=self.rank != 0,
                   **progress_options(isatty(sys.stderr)))
        held.push(closing(bar.close))
        for it in range(self.start, cfg.max_steps):
            began = time.perf_counter()
            lr = self.lr_scheduler.get_last_lr()[0]  # the rate this iteration's step applies (warm-up, decay)
            parts = self.iteration(it)
            parts["lr"] = lr
            self.step = it + 1
            parts["images_per_s"] = cfg.batch.images_per_prompt / (time.perf_counter() - began)
            parts["skipped_steps"] = self.skipped
            parts["peak_memory_gb"] = _peak_memory_bytes(self.device) / 2**30
            failure = None  # rank 0's writes (bar, log, images): told to the others with the stop signal
            try:
                self._report(it, parts, bar, log)
            except Exception as error:  # any failure: raised below, once every rank knows
                if self.world == 1:
                    raise
                failure = error
            # the same on every rank (a collective): rank 0 saves whatever its report did
            saved = (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.max_steps
            if saved:
                self.save(it + 1)
            signum, failed = self._agreed_stop(stop, failure is not None)
            if failure is not None:
                raise failure
            if failed:
                raise OtherRankFailed(f"rank 0 could not write the run's progress, log or images at step {it + 1}, "
                                      "so no rank goes on (its error is in its output)")
            if signum:
                if not saved:
                    self.save(it + 1)
                # the checkpoint is saved: a stderr that cannot be written (a full disk under a Slurm --error
                # file) must not turn the stop's status into an error's
                with contextlib.suppress(OSError):
                    bar.close()
                    if self.rank == 0:
                        name = signal.Signals(signum).name
                        then = "the run's last" if it + 1 == cfg.max_steps else f"{self.resume_hint} continues"
                        print(f"stopped by {name} at step {it + 1}: checkpoint step_{it + 1:08d} saved; {then}",
                              file=sys.stderr, flush=True)
                raise SystemExit(128 + signum)


def _warn_version_changes(path, saved: Optional[dict]) -> None:
    """Warn where the libraries differ from those the checkpoint was saved under (checkpoint.library_versions):
    the resume goes on, but its numbers may differ from an uninterrupted run's."""
    changes = checkpoint.version_changes(saved)
    if changes:
        listed = ", ".join(f"{name} {old} (now {new})" for name, (old, new) in changes.items())
        warnings.warn(f"resume={path} was saved under {listed}: the run continues, but from here it may differ from "
                      "one run under a single installation", stacklevel=3)


def _finite_gradients(params) -> bool:
    """Whether every gradient the parameters hold is finite (those without one: nothing to apply)."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def _peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated by torch; CPU: the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def grid_pixels(originals: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """uint8 [2H, N W, 3]: the originals [N, 3, H, W] in [-1, 1] on the top row, the finetuned images (same
    noise) below."""
    rows = [torch.cat(list(batch.float().clamp(-1, 1).cpu()), dim=-1) for batch in (originals, images)]
    return ((torch.cat(rows, dim=-2) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fairness finetuning of a diffusion model (fastfair).")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/gender.yaml")
    parser.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (same as deepspeed.config=...)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument("--check", action="store_true",
                         help="check the run instead: its start (settings, files, models, resume, output_dir) and "
                              "--check-iterations timed iterations, saving nothing; prints the peak memory, the time "
                              "the run will take and its checkpoints' disk space (exit status 1 if they will not fit)")
    instead.add_argument("--print-config", action="store_true",
                         help="print the resolved settings (the config's bases, defaults and overrides; the paths it "
                              "reads made absolute) as YAML, as the run records them in OUTPUT_DIR/config.yaml, and "
                              "exit")
    parser.add_argument("--check-iterations", type=whole_number(0), default=None, metavar="N",
                        help=f"iterations --check runs (default {DEFAULT_CHECK_ITERATIONS}; 0: none)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. max_steps=2")
    # intermixed: overrides on both sides of --deepspeed_config (parse_args took only the first group)
    args = parser.parse_intermixed_args(argv)
    if args.check_iterations is not None and not args.check:
        parser.error("--check-iterations goes with --check")
    repeated = repeated_override(args.overrides)
    if repeated:
        parser.error(repeated)
    given = [text for text in args.overrides if text.split("=", 1)[0].strip() == "deepspeed.config"]
    if args.deepspeed_config and given:  # the flag would win without a word
        parser.error(f"--deepspeed_config {args.deepspeed_config} and {given[0]} both name the DeepSpeed JSON: give "
                     "one of them")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"deepspeed.config={args.deepspeed_config}"] if args.deepspeed_config else [])
    cfg = load_config(args.config, overrides)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if args.print_config:
        print(config_yaml(cfg), end="")
        try:  # printed all the same (a base to edit need not run as it is); said so on stderr, not in the YAML
            validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), device)
        except ConfigError as error:
            print(f"note: a run of these settings on this machine would be refused:\n{error}", file=sys.stderr)
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
    trainer = None

    def interrupted():  # Ctrl-C: where the run stopped and how to go on, not the traceback of its frames
        if int(os.environ.get("RANK", 0)) == 0:
            message = "check interrupted; nothing was saved" if args.check else interrupted_message(cfg, trainer)
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(130) from None

    with noticing_ctrl_c() as ctrl_c:
        try:
            with process_group(device.split(":")[0]):
                trainer = Trainer(cfg, device)
                if args.check:
                    iterations = DEFAULT_CHECK_ITERATIONS if args.check_iterations is None else args.check_iterations
                    report = trainer.check(iterations)
                    if trainer.rank == 0:
                        print(report.summary() + "\nnothing was saved: the same command without --check runs it")
                    if report.problems():
                        raise SystemExit(1)
                    return
                trainer.train()
        except KeyboardInterrupt:
            interrupted()
        except Exception:
            if not ctrl_c.came:
                raise
            interrupted()  # a Ctrl-C that a library turned into another exception (fastfair.run_control)


def interrupted_message(cfg: TrainConfig, trainer: Optional[Trainer], hint: Optional[str] = None) -> str:
    """What a run interrupted by Ctrl-C says: the step it reached and the checkpoint a resume=auto continues from
    (``hint``: how the caller continues it, default the trainer's resume_hint)."""
    step = getattr(trainer, "step", None)
    where = f"at step {step}" if step is not None else "before training began"
    saved = checkpoint.list_checkpoints(cfg.output_dir)
    if saved:
        hint = hint or getattr(trainer, "resume_hint", "resume=auto")
        return f"interrupted {where}; last checkpoint {saved[max(saved)].name}; {hint} continues from it"
    return f"interrupted {where}; no checkpoint saved yet: a rerun starts afresh"
