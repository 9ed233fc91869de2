"""fastfair.dft.sample gives exactly the adjusted gradient of the literal Algorithm A.1 (fastfair.reference)."""
import itertools

import pytest
import torch

import fastfair.dft as dft
from fastfair.dft import sample
from fastfair.reference import reference_sample
from fastfair.testing import TinyCondNet, tiny_scheduler, tiny_unet

SCHED = tiny_scheduler()


def make_problem(dtype=torch.float64, batch=2, seed=0, lora=False, train_names=("to_k.weight", "conv_in"), diffusers=False):
    """(unet, trainable params, z_T, cond, uncond, target). The many-call tests use TinyCondNet; ``diffusers`` or
    ``lora`` use a real (tiny) diffusers UNet2DConditionModel."""
    unet = tiny_unet(dtype=dtype) if (diffusers or lora) else TinyCondNet().to(dtype)
    unet.requires_grad_(False)
    if lora:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with torch.no_grad():  # peft zero-inits lora_B; randomize so every LoRA weight gets a gradient
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        unet.to(dtype)
        train = [p for n, p in unet.named_parameters() if "lora_" in n]
    else:
        train = [p for n, p in unet.named_parameters() if any(k in n for k in train_names)]
    for p in train:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    cond = torch.randn(batch, 5, 16, generator=g, dtype=dtype).requires_grad_()
    uncond = torch.randn(1, 5, 16, generator=g, dtype=dtype).requires_grad_()
    target = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    return unet, train, z_T, cond, uncond, target


def grads_of(fn, problem, cfg=True, **kw):
    unet, train, z_T, cond, uncond, target = problem
    z0 = fn(unet, SCHED, z_T, cond, uncond if cfg else None, guidance_scale=7.5, **kw)
    loss = ((z0 - target) ** 2).sum() + z0.sin().sum()
    inputs = [cond] + ([uncond] if cfg else []) + train
    return z0.detach(), torch.autograd.grad(loss, inputs)


def max_rel(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("mode,cfg,steps", list(itertools.product(["paper", "exact", "none"], [True, False], [1, 2, 5, 20])))
def test_gradients_equal_reference(mode, cfg, steps):
    problem = make_problem()
    z_ours, g_ours = grads_of(sample, problem, cfg, num_steps=steps, coefficients=mode)
    z_ref, g_ref = grads_of(reference_sample, problem, cfg, num_steps=steps, coefficients=mode)
    assert torch.equal(z_ours, z_ref) or (z_ours - z_ref).abs().max() < 1e-12
    assert max_rel(g_ours, g_ref) <= 1e-8
    if steps in (2, 20):  # diffusers' own step (float32 inside) as the cross-check
        _, g_diff = grads_of(reference_sample, problem, cfg, num_steps=steps, coefficients=mode, step="diffusers")
        assert max_rel(g_ours, g_diff) <= 1e-4


@pytest.mark.parametrize("cond_grad", [True, False])
@pytest.mark.parametrize("mode,steps,keep", [("paper", 2, 0), ("exact", 5, 0), ("paper", 5, 2)])
def test_trainable_weights_get_both_guidance_branches_with_frozen_embeddings(cond_grad, mode, steps, keep):
    """A U-Net LoRA trained under a frozen text encoder: the prompts' embeddings (the empty prompt's at least) need
    no gradient, the weights do; their gradient takes both CFG branches, (1 - w) of it through the unconditional
    one, which a backward that recomputes that branch only for an embedding needing grad would leave out."""
    unet, train, z_T, cond, uncond, target = make_problem()
    cond, uncond = cond.detach().requires_grad_(cond_grad), uncond.detach()
    grads = []
    for fn, options in ((sample, dict(keep_graph_steps=keep)), (reference_sample, {})):
        z0 = fn(unet, SCHED, z_T, cond, uncond, guidance_scale=7.5, num_steps=steps, coefficients=mode, **options)
        loss = ((z0 - target) ** 2).sum() + z0.sin().sum()
        grads.append(torch.autograd.grad(loss, ([cond] if cond_grad else []) + train))
    assert max_rel(*grads) <= 1e-8


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_each_kernel_backend_gives_the_reference_gradient_in_float64(monkeypatch, backend):
    """FASTFAIR_KERNELS=<backend>: the engine's solver steps and gradient fan-out in that backend, with and without
    guidance, kept graphs and chunks. Triton runs on CPU only in its interpreter, which must be set before triton
    is imported: that case reruns this test in a child process with TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys

    from fastfair.kernels import unavailable_reason

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        test = f"{__file__}::test_each_kernel_backend_gives_the_reference_gradient_in_float64[triton]"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                                env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
        return
    if backend == "native":
        import shutil

        from fastfair.kernels import native

        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler to build fastfair._C")
        native.load(jit=True)  # built on the fly where the checkout has no fastfair._C, as test_kernels_native does
    reason = unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.fail(f"{backend} should run on CPU here: {reason}")
    monkeypatch.setenv("FASTFAIR_KERNELS", backend)
    calls = []
    import fastfair.kernels as kernels

    for op in ("solver_step", "grad_fanout"):
        real = kernels.dispatch.backend_function(op, backend)
        monkeypatch.setitem(kernels.dispatch._FUNCTIONS[op], backend,
                            lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    problem = make_problem()
    for cfg, options in ((True, dict(recompute_chunk=2)), (False, dict(keep_graph_steps=1)), (True, {})):
        z_ours, g_ours = grads_of(sample, problem, cfg, num_steps=4, coefficients="paper", **options)
        z_ref, g_ref = grads_of(reference_sample, problem, cfg, num_steps=4, coefficients="paper")
        assert (z_ours - z_ref).abs().max() < 1e-12
        assert max_rel(g_ours, g_ref) <= 1e-8
    assert {"solver_step", "grad_fanout"} <= set(calls)  # the backend did the work, not a fallback


def test_diffusers_cross_check_steps_the_schedule_it_is_given():
    """reference_sample(step="diffusers") steps with a scheduler rebuilt from the config: an option set after a
    conversion (listed in the config's _use_default_values) must survive the rebuild, or the cross-check would
    step another schedule than the timesteps it feeds the U-Net."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         skip_prk_steps=True, set_alpha_to_one=False)
    sch = DPMSolverMultistepScheduler.from_config(pndm.config)
    assert "solver_type" in sch.config["_use_default_values"]
    sch.register_to_config(solver_type="heun")
    unet, _, z_T, cond, uncond, _ = make_problem()
    with torch.no_grad():
        z_ours = sample(unet, sch, z_T, cond, uncond, guidance_scale=7.5, num_steps=10)
        z_diff = reference_sample(unet, sch, z_T, cond, uncond, guidance_scale=7.5, num_steps=10, step="diffusers")
    assert ((z_ours - z_diff).norm() / z_ours.norm()).item() <= 1e-5


@pytest.mark.parametrize("chunk,keep", [(1, 0), (2, 0), (5, 0), (3, 2), (None, 5), (4, 1)])
def test_recompute_chunk_and_kept_graphs_do_not_change_the_gradient(chunk, keep):
    problem = make_problem()
    _, g_ref = grads_of(reference_sample, problem, num_steps=5)
    _, g_ours = grads_of(sample, problem, num_steps=5, recompute_chunk=chunk, keep_graph_steps=keep)
    assert max_rel(g_ours, g_ref) <= 1e-8


@pytest.mark.parametrize("images,chunk,keep,frozen", [(1, 1, 0, 0), (2, 2, 0, 0), (1, 3, 2, 0), (2, 1, 0, 1),
                                                       (2, 2, 1, 2), (5, 1, 0, 0)])
def test_recompute_images_slices_the_batch_without_changing_the_gradient(monkeypatch, images, chunk, keep, frozen):
    """recompute_images: the backward's U-Net calls take at most that many images (of the differentiated rows,
    both CFG branches), the gradient is the whole-batch recompute's (per-image embeddings; frozen rows left out)."""
    unet, train, z_T, cond, uncond, target = make_problem(batch=3)
    frozen_z = torch.randn(frozen, 4, 8, 8, dtype=torch.float64)
    frozen_cond = torch.randn(frozen, 5, 16, dtype=torch.float64)
    both_cond = torch.cat([frozen_cond, cond]).detach().requires_grad_()
    inputs = [both_cond, uncond] + train
    grads = {}
    calls = {}
    original = dft._unet_eps
    for name, per_call in (("whole", None), ("sliced", images)):
        calls[name] = []
        monkeypatch.setattr(dft, "_unet_eps", lambda u, x, t, e, seen=calls[name]: (
            seen.append(x.shape[0]) if torch.is_grad_enabled() else None) or original(u, x, t, e))
        z0 = sample(unet, SCHED, torch.cat([frozen_z, z_T]), both_cond, uncond, num_steps=5, recompute_chunk=chunk,
                    keep_graph_steps=keep, frozen_rows=frozen, recompute_images=per_call)
        grads[name] = torch.autograd.grad(((z0[frozen:] - target) ** 2).sum() + z0.sin().sum(), inputs)
    assert max_rel(grads["sliced"], grads["whole"]) <= 1e-12
    recomputed = calls["sliced"][keep:]  # the kept steps' graphs are made in the forward, whole
    steps = [min(chunk, 5 - keep - k) for k in range(0, 5 - keep, chunk)]
    slices = [min(images, 3 - first) for first in range(0, 3, images)]
    assert recomputed == [2 * n * b for n in steps for b in slices]  # 2 CFG branches x steps x images
    with pytest.raises(ValueError, match="recompute_images=0"):
        sample(unet, SCHED, z_T, cond, uncond, recompute_images=0)


def test_diffusers_unet():
    problem = make_problem(diffusers=True)
    _, g_ref = grads_of(reference_sample, problem, num_steps=3)
    _, g_ours = grads_of(sample, problem, num_steps=3, recompute_chunk=2, keep_graph_steps=1)
    assert max_rel(g_ours, g_ref) <= 1e-8


def test_lora_wrapped_unet():
    problem = make_problem(lora=True)
    assert len(problem[1]) > 0
    _, g_ref = grads_of(reference_sample, problem, num_steps=3, coefficients="exact")
    _, g_ours = grads_of(sample, problem, num_steps=3, coefficients="exact", recompute_chunk=2)
    assert max_rel(g_ours, g_ref) <= 1e-8


def test_z_T_gradient_and_unadjusted_reference_differs():
    unet, train, z_T, cond, uncond, target = make_problem()
    z_T = z_T.clone().requires_grad_()
    outs = []
    for fn in (sample, reference_sample):
        z0 = fn(unet, SCHED, z_T, cond, uncond, num_steps=5)
        outs.append(torch.autograd.grad(((z0 - target) ** 2).sum(), [z_T, cond])[0])
    assert max_rel([outs[0]], [outs[1]]) <= 1e-10
    # The exact (unadjusted) gradient is a different quantity: guard against a reference that ignores `adjusted`.
    z0 = reference_sample(unet, SCHED, z_T, cond, uncond, num_steps=5, adjusted=False)
    g_exact = torch.autograd.grad(((z0 - target) ** 2).sum(), [cond])[0]
    z0 = reference_sample(unet, SCHED, z_T, cond, uncond, num_steps=5)
    g_adj = torch.autograd.grad(((z0 - target) ** 2).sum(), [cond])[0]
    assert max_rel([g_exact], [g_adj]) > 1e-3


@pytest.mark.parametrize("keep", [0, 2])
def test_frozen_unet_text_only_skips_uncond_branch(monkeypatch, keep):
    """With no trainable U-Net parameter and a frozen uncond, the backward runs only the cond branch, and a kept
    step's graph covers only the cond branch (its uncond rows run in a separate no-grad call)."""
    unet, _, z_T, cond, uncond, target = make_problem(train_names=())
    uncond = uncond.detach()
    batches = []
    original = dft._unet_eps

    def counting(unet_, x, t, emb):
        if torch.is_grad_enabled():
            batches.append(x.shape[0])
        return original(unet_, x, t, emb)

    monkeypatch.setattr(dft, "_unet_eps", counting)
    z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=4, recompute_chunk=2, keep_graph_steps=keep)
    (g_ours,) = torch.autograd.grad(((z0 - target) ** 2).sum(), [cond])
    # kept steps: one graph call of B cond rows each; the rest: chunks of 2 steps x B (no uncond copy)
    assert batches == [z_T.shape[0]] * keep + [2 * z_T.shape[0]] * ((4 - keep) // 2)
    monkeypatch.setattr(dft, "_unet_eps", original)
    z0 = reference_sample(unet, SCHED, z_T, cond, uncond, num_steps=4)
    (g_ref,) = torch.autograd.grad(((z0 - target) ** 2).sum(), [cond])
    assert max_rel([g_ours], [g_ref]) <= 1e-8


def test_grad_steps_is_exactly_unbiased_over_all_subsets(monkeypatch):
    S, K = 5, 2
    problem = make_problem()
    _, g_full = grads_of(sample, problem, num_steps=S)
    subsets = list(itertools.combinations(range(S), K))
    total = None
    for subset in subsets:
        monkeypatch.setattr(dft, "_select_grad_steps", lambda n, k, gen, s=subset: (list(s), n / k))
        _, g = grads_of(sample, problem, num_steps=S, grad_steps=K)
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    mean = [t / len(subsets) for t in total]
    assert max_rel(mean, g_full) <= 1e-10
    # A single subset is not the full gradient (the estimate is random, not a rescaled copy).
    assert max_rel(g, g_full) > 1e-3


def test_grad_steps_statistical_unbiasedness():
    S, K, draws = 8, 3, 80
    problem = make_problem(dtype=torch.float32, batch=1)
    _, g_full = grads_of(sample, problem, num_steps=S)
    gen = torch.Generator().manual_seed(123)
    samples = torch.stack([torch.cat([t.flatten() for t in grads_of(sample, problem, num_steps=S, grad_steps=K,
                                                                    generator=gen)[1]]) for _ in range(draws)])
    full = torch.cat([t.flatten() for t in g_full])
    mean, stderr = samples.mean(0), samples.std(0) / draws**0.5
    z = ((mean - full) / (stderr + 1e-12 * full.abs().max())).abs()
    # Per coordinate |z| should look standard normal: no coordinate far out, and most within 3.
    assert (z < 3).float().mean() > 0.97 and z.max() < 6


def test_bf16_autocast_is_finite_and_close_to_fp32():
    problem = make_problem(dtype=torch.float32, diffusers=True)
    _, g32 = grads_of(sample, problem, num_steps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf, g_bf = grads_of(sample, problem, num_steps=3, recompute_chunk=2)
    assert z_bf.dtype == torch.float32  # the trajectory stays fp32 under autocast
    assert all(torch.isfinite(g).all() for g in g_bf)
    assert max_rel(g_bf, g32) < 0.1


def test_no_grad_path_matches_reference_forward():
    unet, _, z_T, cond, uncond, _ = make_problem(train_names=())
    with torch.no_grad():
        a = sample(unet, SCHED, z_T, cond, uncond, num_steps=6)
        b = reference_sample(unet, SCHED, z_T, cond, uncond, num_steps=6)
    assert not a.requires_grad
    assert (a - b).abs().max() < 1e-12


def test_input_errors_name_the_argument():
    unet, _, z_T, cond, uncond, _ = make_problem()
    with pytest.raises(ValueError, match="coefficients"):
        sample(unet, SCHED, z_T, cond, uncond, coefficients="bogus")
    with pytest.raises(ValueError, match="grad_steps"):
        sample(unet, SCHED, z_T, cond, uncond, num_steps=4, grad_steps=5)
    with pytest.raises(ValueError, match="cond"):
        sample(unet, SCHED, z_T, cond[:, 0], uncond)
    with pytest.raises(ValueError, match="recompute_chunk"):
        sample(unet, SCHED, z_T, cond, uncond, recompute_chunk=0)
    unet.train()
    unet.conv_in = torch.nn.Sequential(torch.nn.Dropout(0.1), unet.conv_in)
    with pytest.raises(ValueError, match="dropout"):
        sample(unet, SCHED, z_T, cond, uncond, num_steps=2)


@pytest.mark.parametrize("keep", [0, 3])
def test_frozen_rows_ride_along_without_gradient(monkeypatch, keep):
    """frozen_rows: the leading images share the U-Net calls but are neither backpropagated nor recomputed, and
    a kept step's graph leaves them out (they run in a separate no-grad call)."""
    unet, train, z_T, cond, uncond, target = make_problem(batch=2)
    frozen_cond = torch.randn(2, 5, 16, dtype=torch.float64)
    both_cond = torch.cat([frozen_cond, cond])
    z0_alone = sample(unet, SCHED, z_T, cond, uncond, num_steps=4)
    g_alone = torch.autograd.grad(((z0_alone - target) ** 2).sum(), [cond, uncond] + train)

    recomputed = []
    original = dft._unet_eps
    monkeypatch.setattr(dft, "_unet_eps", lambda u, x, t, e: (recomputed.append(x.shape[0])
                                                              if torch.is_grad_enabled() else None) or original(u, x, t, e))
    z0 = sample(unet, SCHED, torch.cat([z_T, z_T]), both_cond, uncond, num_steps=4, frozen_rows=2, recompute_chunk=4,
                keep_graph_steps=keep)
    loss = ((z0[2:] - target) ** 2).sum() + 100 * z0[:2].sum()  # the frozen rows' gradient must be ignored
    g_both = torch.autograd.grad(loss, [both_cond, uncond] + train)
    # kept steps: 2 CFG branches x 2 grad rows each; then one chunk of the other steps x 2 x 2
    assert recomputed == [2 * 2] * keep + [(4 - keep) * 2 * 2]
    assert (z0[2:].detach() - z0_alone.detach()).abs().max() < 1e-12
    assert g_both[0][:2].abs().max() == 0
    assert max_rel([g_both[0][2:]] + list(g_both[1:]), g_alone) <= 1e-10
    with pytest.raises(ValueError, match="frozen_rows"):
        sample(unet, SCHED, z_T, cond, uncond, frozen_rows=2)


def test_frozen_rows_get_no_z_T_gradient():
    """The first frozen_rows images carry no gradient (their dL/dz_0 is ignored) - z_T included."""
    unet, train, z_T, cond, uncond, target = make_problem(batch=3)
    z_T = z_T.clone().requires_grad_()
    z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3, frozen_rows=1)
    (g,) = torch.autograd.grad(((z0 - target) ** 2).sum(), [z_T])
    assert torch.equal(g[0], torch.zeros_like(g[0])) and g[1:].abs().sum() > 0
