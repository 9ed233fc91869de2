"""bench/baseline.py computes the same adjusted gradient as fastfair.dft.sample; bench/train_step.py runs."""
import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_memory import recording_peak_memory

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import train_step  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__} cannot run a CLIP text encoder in float64 (it fills its "
                    "causal mask with float64's minimum in a float32 tensor: overflow); these float64 checks need 5.x")
    paths = train_step.save_models("tiny", tmp_path_factory.mktemp("bench"), 16)
    model, scheduler, objective, _ = train_step.load_setup(paths, "cpu", lora_rank=4)
    for module in (model.text_encoder, model.unet, objective.decoder, objective.classifier, objective.semantics):
        module.double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): the finetuned passes would equal the frozen ones
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
        assert not torch.allclose(model.encode(["a doctor"]), model.encode_original(["a doctor"]))
    return paths, model, scheduler, objective


def _grads(step, **kwargs):
    params = kwargs["model"].parameters()
    for p in params:
        p.grad = None
    step(**kwargs)
    return [p.grad.clone() for p in params]


def test_the_iteration_loss_is_the_whole_batch_s_whatever_the_micro_batches(setup):
    """baseline_step returns the iteration's loss (the sum over its micro-batches of their share), as fastfair_step
    does: the same value for one pass of 2 images, two passes of 1, and fastfair's batched pass."""
    _, model, scheduler, objective = setup
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    common = dict(model=model, scheduler=scheduler, objective=objective, z_T=z_T, prompt="a doctor", num_steps=2)
    whole = train_step.baseline_step(micro_batch=None, **common)
    parts = train_step.baseline_step(micro_batch=1, **common)
    ours = train_step.fastfair_step(**common)
    for p in model.parameters():  # the gradients these accumulated: no later test's business
        p.grad = None
    assert whole.item() > 0
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)  # float32: the objective takes logits as float
    assert ours.item() == pytest.approx(whole.item(), rel=1e-6)


def recomputed(objective, rows):
    """A copy of ``objective`` with fastfair's recomputed judges, in slices of ``rows`` images when set (the
    bench's fastfair workers with --micro-batch)."""
    import copy

    from fastfair.recompute import Recomputed

    ours = train_step.recompute_objective(copy.deepcopy(objective), rows)
    assert isinstance(ours.decoder, Recomputed) == (rows is not None)
    return ours


@pytest.mark.parametrize("micro_batch", [None, 1])
def test_baseline_gradient_equals_fastfair(setup, micro_batch):
    _, model, scheduler, objective = setup
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    common = dict(model=model, scheduler=scheduler, z_T=z_T, prompt="a doctor", num_steps=3)
    ours = _grads(train_step.fastfair_step, objective=recomputed(objective, micro_batch),
                  recompute_images=micro_batch, **common)
    theirs = _grads(train_step.baseline_step, objective=objective, micro_batch=micro_batch, **common)
    assert sum(float(g.abs().sum()) for g in ours) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_baseline_gradient_differs_from_unadjusted_coefficients(setup, monkeypatch):
    # the check above must be able to fail: fastfair with other coefficients gives another gradient
    _, model, scheduler, objective = setup
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    common = dict(model=model, scheduler=scheduler, objective=objective, z_T=z_T, prompt="a nurse", num_steps=3)
    theirs = _grads(train_step.baseline_step, **common)
    import fastfair.dft as dft

    original = dft.sample
    monkeypatch.setattr(dft, "sample", lambda *a, **k: original(*a, **{**k, "coefficients": "none"}))
    ours = _grads(train_step.fastfair_step, **common)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) > 1e-6


def test_micro_batch_is_validated(setup):
    _, model, scheduler, objective = setup
    with pytest.raises(ValueError, match="micro_batch"):
        train_step.baseline_step(model, scheduler, objective, torch.zeros(1, 4, 8, 8, dtype=torch.float64),
                                 "x", num_steps=2, micro_batch=0)


def test_train_step_cli_end_to_end(setup, tmp_path, bench_workers_in_process):
    paths, *_ = setup
    models = tmp_path / "models"
    models.mkdir()
    (models / "paths.json").write_text(json.dumps({"kind": "tiny", "paths": paths}))
    out = tmp_path / "r.json"
    train_step.main(["--model", "tiny", "--images", "1", "--steps", "2", "--rounds", "1", "--iters", "1",
                     "--warmup", "0", "--models-dir", str(models), "--json", str(out),
                     "--impls", "baseline_sdpa,fastfair,fastfair_fast"])
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["results"]] == ["baseline_sdpa", "fastfair", "fastfair_fast"]
    # on CPU each configuration's memory run, then its timed run; on CUDA one run (here in this process: no memory
    # figure is asserted, the resident set of a process that ran other work is no clean measure)
    runs = 1 if torch.cuda.is_available() else 2
    assert bench_workers_in_process == [impl for impl in ("baseline_sdpa", "fastfair", "fastfair_fast")
                                        for _ in range(runs)]
    for row in data["results"]:
        assert row["s_per_iter"] > 0 and isinstance(row["peak_bytes"], int) and row["model_flops"]["total"] > 0
        assert set(row["phases_s"]) == {"sampling", "decode_losses", "backward", "optimizer"}
    assert data["results"][1]["model_speedup_vs_baseline_sdpa"] > 1
    assert "| fastfair_fast (k=" in out.with_suffix(".md").read_text()
    lean = next(r for r in data["runs"] if "kept_graph_bytes" in r)
    assert 0 < lean["kept_graph_bytes"] < lean["kept_graph_bytes_plain"]  # fastfair.lean_graph saves less
    assert 0 < lean["kept_attention_bytes"] < lean["kept_graph_bytes"]


def test_train_step_reports_each_run_as_it_finishes(setup, tmp_path, monkeypatch, bench_workers_in_process):
    """A GPU run is short and rare: a worker that fails (or a time limit) after the first configuration still
    leaves its row in the JSON and Markdown report (the report was written once all configurations had run)."""
    paths, *_ = setup
    models = tmp_path / "models"
    models.mkdir()
    (models / "paths.json").write_text(json.dumps({"kind": "tiny", "paths": paths}))
    real = train_step.run_worker

    def worker(cfg, peak_limit=None):
        if cfg["impl"] != "baseline_sdpa":
            raise RuntimeError("worker died")
        return real(cfg, peak_limit)

    monkeypatch.setattr(train_step, "run_worker", worker)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="worker died"):
        train_step.main(["--model", "tiny", "--images", "1", "--steps", "2", "--rounds", "1", "--iters", "1",
                         "--warmup", "0", "--models-dir", str(models), "--json", str(out),
                         "--impls", "baseline_sdpa,fastfair"])
    assert [r["impl"] for r in json.loads(out.read_text())["results"]] == ["baseline_sdpa"]
    assert "| baseline_sdpa |" in out.with_suffix(".md").read_text()


def test_train_step_probes_kept_steps_only_for_fastfair_fast(setup, tmp_path, monkeypatch):
    """The lean worker's keep probe (a backward with hooks; its bytes fill the report's fastfair_fast paragraph)
    runs only when fastfair_fast is asked for."""
    paths, *_ = setup
    models = tmp_path / "models"
    models.mkdir()
    (models / "paths.json").write_text(json.dumps({"kind": "tiny", "paths": paths}))
    probed = []

    def worker(cfg, peak_limit=None):
        probed.append((cfg["impl"], cfg["probe_keep"]))
        return {"impl": cfg["impl"], "s_per_iter_samples": [1.0], "peak_bytes": 1}

    monkeypatch.setattr(train_step, "run_worker", worker)
    monkeypatch.setattr(train_step, "write_report", lambda **kwargs: None)
    train_step.main(["--model", "tiny", "--images", "1", "--steps", "2", "--rounds", "2", "--iters", "1",
                     "--models-dir", str(models), "--json", str(tmp_path / "r.json"),
                     "--impls", "baseline_sdpa,fastfair"])
    assert probed == [("baseline_sdpa", False), ("fastfair", False)] * 2


def test_memory_sweep_reuses_the_main_point_and_reports_each_point(setup, tmp_path, monkeypatch):
    """The sweep's table holds the main configuration's point without measuring it again (gpu_check's sweep of
    5, 10, 40 steps gets its 20-step point), and a report follows each point (a time limit keeps them)."""
    paths, *_ = setup
    models = tmp_path / "models"
    models.mkdir()
    (models / "paths.json").write_text(json.dumps({"kind": "tiny", "paths": paths}))
    measured, reported = [], []

    def worker(cfg, peak_limit=None):
        measured.append((cfg["impl"], cfg["steps"], cfg["images"]))
        return {"impl": cfg["impl"], "images": cfg["images"], "steps": cfg["steps"], "s_per_iter_samples": [1.0],
                "peak_bytes": 1000 * cfg["steps"] + cfg["images"], "micro_batch": cfg["micro_batch"] or cfg["images"]}

    monkeypatch.setattr(train_step, "run_worker", worker)
    monkeypatch.setattr(train_step, "write_report", lambda **kwargs: reported.append(list(kwargs["sweep"])))
    train_step.main(["--model", "tiny", "--images", "1", "--steps", "2", "--rounds", "1", "--iters", "1",
                     "--models-dir", str(models), "--impls", "baseline_sdpa,fastfair",
                     "--sweep-steps", "2,3", "--sweep-images", "2"])
    assert measured == [("baseline_sdpa", 2, 1), ("fastfair", 2, 1),  # the main table
                        ("baseline_sdpa", 3, 1), ("baseline_sdpa", 2, 2), ("fastfair", 3, 1), ("fastfair", 2, 2)]
    assert [(p["impl"], p["images"], p["steps"], p["peak_bytes"]) for p in reported[-1]] == [
        ("baseline_sdpa", 1, 2, 2001), ("baseline_sdpa", 1, 3, 3001), ("baseline_sdpa", 2, 2, 2002),
        ("fastfair", 1, 2, 2001), ("fastfair", 1, 3, 3001), ("fastfair", 2, 2, 2002)]
    assert [len(sweep) for sweep in reported[2:]] == [2, 3, 5, 6, 6]  # one report per measured point, then final


def test_fast_plan_shrinks_by_the_overshoot_until_its_fresh_peak_fits(monkeypatch):
    """fit_fast_plan: a plan whose fresh-process peak is over the budget is replaced by keeps_for_budget of its
    modelled bytes less the overshoot; the first plan that fits is the one timed."""
    peaks, calls = {}, []

    def fake_run_worker(cfg, peak_limit=None):
        plan = (cfg["keep_graph_steps"], cfg["keep_attention_steps"])
        calls.append(plan)
        peak = peaks.get(plan, 200)
        return {"peak_bytes": peak, "s_per_iter_samples": [1.0] if peak_limit is None or peak <= peak_limit else []}

    monkeypatch.setattr(train_step, "run_worker", fake_run_worker)
    lean = {"kept_graph_bytes": 10, "kept_attention_bytes": 1, "kept_attention_share": 0.7,
            "keeps_for_budget": [6, 14]}
    peaks.update({(6, 14): 100})
    result, tried = train_step.fit_fast_plan({"steps": 20}, 100, lean)
    assert tried == [[[6, 14], 100]] and calls == [(6, 14)] and result["s_per_iter_samples"] == [1.0]
    # 20 over: (6, 14) models 6 * 10 + 14 * 1 = 74 bytes, so the budget for the next plan is 54: 20 attention
    # keeps (r / G_att > 1 / G) and 3 upgrades at 9; that one is 1 over: 45 - 1 -> 20 attention keeps, 2 upgrades
    calls.clear()
    peaks.update({(6, 14): 120, (3, 17): 101, (2, 18): 95})
    result, tried = train_step.fit_fast_plan({"steps": 20}, 100, lean)
    assert tried == [[[6, 14], 120], [[3, 17], 101], [[2, 18], 95]] and result["s_per_iter_samples"] == [1.0]
    calls.clear()  # nothing fits (38 - 30 = 8 bytes: (0, 8) peaks at 200): the lean plan ends it, timed anyway
    peaks.update({(2, 18): 130, (0, 0): 101})
    result, tried = train_step.fit_fast_plan({"steps": 20}, 100, lean)
    assert [plan for plan, _ in tried] == [[6, 14], [3, 17], [2, 18], [0, 8], [0, 0]]
    assert result["s_per_iter_samples"] == [1.0] and calls[-1] == (0, 0) and calls.count((0, 0)) == 1


def test_largest_batch_for_a_budget():
    sweep = [{"impl": "fastfair", "images": n, "steps": 20, "peak_bytes": 100 + 10 * n} for n in (1, 2)]
    assert train_step.largest_batch(sweep, "fastfair", 20, 200) == 10


def test_flop_model_counts_input_only_backwards():
    import flops

    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 8).requires_grad_(False), torch.nn.Linear(8, 3).requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    # input gradients only: lin2's [5,3]x[3,8] and lin1's [5,8]x[8,4]; no weight gradient, tanh is not a matmul
    assert flops.count_input_backward_flops(lambda: lin2(torch.tanh(lin1(x))), [x]) == 2 * 5 * 3 * 8 + 2 * 5 * 8 * 4
    q = torch.randn(2, 6, 4, requires_grad=True)
    # scores = q q^T: the backward multiplies by q twice (once per operand) -> twice the forward's matmul
    assert flops.count_input_backward_flops(lambda: q @ q.transpose(1, 2), [q]) == 2 * (2 * 2 * 6 * 6 * 4)

    unit = dict(unet=10, unet_input_backward=15, vae_decode=0, judges=0, embed=0, text=0)  # b = Ub / U = 1.5
    ratio = lambda impl, **kw: (flops.iteration_flops("baseline", unit, 2, 20)["total"]  # noqa: E731
                                / flops.iteration_flops(impl, unit, 2, 20, **kw)["total"])
    assert ratio("fastfair") == pytest.approx((8 + 2 * 1.5) / (6 + 2 * 1.5))
    assert ratio("fastfair_fast", keep_graph_steps=20) == pytest.approx((8 + 2 * 1.5) / (4 + 2 * 1.5))
    unit["unet_attention"] = 4  # attention-only keeps recompute U - Ua = 6 of 10
    assert ratio("fastfair_fast", keep_attention_steps=20) == pytest.approx((8 + 2 * 1.5) / (4 + 2 * 0.6 + 2 * 1.5))
    assert ratio("fastfair_fast", keep_graph_steps=5, keep_attention_steps=20) == pytest.approx(  # 15 left
        (8 + 2 * 1.5) / (4 + 2 * 0.6 * 15 / 20 + 2 * 1.5))
    assert ratio("fastfair_k5", grad_steps=5) == pytest.approx((8 + 2 * 1.5) / (4 + 2 * 2.5 * 5 / 20))
    unit["unet_recompute"] = 8  # the baseline's checkpointing recomputes 0.8 U
    assert ratio("fastfair") == pytest.approx((6 + 2 * 0.8 + 2 * 1.5) / (6 + 2 * 1.5))
    unit.update(vae_decode=3)
    lean, sliced = (flops.iteration_flops("fastfair", unit, 2, 20, sliced_judges=s) for s in (False, True))
    assert sliced["decode_losses"] - lean["decode_losses"] == 2 * 3  # one more decoder forward per image
    assert sliced["total"] - lean["total"] == 2 * 3


def test_each_phase_of_the_flop_model_is_its_docstrings_formula(monkeypatch):
    """bench/flops.py's table, term by term, with a distinct value per unit (a dropped or doubled term shows)."""
    import flops

    U, Ub, Ur, Ua, D, J, E, T = 1000, 1100, 800, 300, 70, 50, 40, 3
    unit = dict(unet=U, unet_input_backward=Ub, unet_recompute=Ur, unet_attention=Ua, vae_decode=D, judges=J,
                embed=E, text=T)
    N, S, M, K, k, a = 2, 20, 3, 10, 4, 2
    assert flops.iteration_flops("baseline", unit, N, S, micro_batches=M) == {
        "sampling": 6 * N * S * U, "decode_losses": 3 * N * D + 2 * N * J,
        "backward": 2 * N * S * Ur + 2 * N * S * Ub + N * D + N * J, "text": (4 + 2 * M) * T + 2 * M * 2 * T,
        "total": 6 * N * S * U + 3 * N * D + 2 * N * J + 2 * N * S * (Ur + Ub) + N * D + N * J
        + (4 + 2 * M) * T + 4 * M * T}
    ours = flops.iteration_flops("fastfair", unit, N, S, keep_graph_steps=k, grad_steps=K, keep_attention_steps=a)
    assert {key: value for key, value in ours.items() if key != "total"} == {
        "sampling": 4 * N * S * U, "decode_losses": 4 * N * D + 3 * N * J + N * E,
        "backward": 2 * N * (K - k - a) * U + 2 * N * a * (U - Ua) + 2 * N * K * Ub, "text": 4 * T + 4 * T}
    assert ours["total"] == sum(value for key, value in ours.items() if key != "total")
    # the matmul rate: 2 n^3 FLOPs per n x n product, over the best timed batch
    clock = iter(range(0, 1000, 2))
    monkeypatch.setattr(flops.time, "perf_counter", lambda: float(next(clock)))
    assert flops.matmul_rate("cpu", torch.float32, size=8, seconds=50) == pytest.approx(2 * 8**3 / (2 / 5))


def test_sliced_decoder_costs_one_more_forward_than_blockwise():
    """The FLOP model's ``sliced_judges`` term, counted on a real VAE: the decode's forward and backward to z with
    the decoder checkpointed block-wise, then also per slice (``loss.judge_images``), differ by one decoder forward
    of the batch less its last convolution (torch's non-reentrant checkpoint stops a rebuild at the last tensor the
    backward needs: conv_out's input); block-wise alone adds at most one forward to the plain decode."""
    import flops
    from diffusers import AutoencoderKL

    from fastfair.models import LatentDecoder
    from fastfair.recompute import Recomputed, recompute_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16).eval().requires_grad_(False)
    z = torch.randn(3, 4, 8, 8, requires_grad=True)
    decoder = LatentDecoder(vae, clamp=False)

    def forward_and_backward(decode):
        from torch.utils.flop_counter import FlopCounterMode

        with flops.attention_as_matmuls(), FlopCounterMode(display=False) as counter:
            decode(z).sum().backward()
        z.grad = None
        return counter.get_total_flops()

    forward = flops.count_flops(lambda: decoder(z))
    plain = forward_and_backward(decoder)
    recompute_decoder(vae)
    blockwise = forward_and_backward(decoder)
    sliced = forward_and_backward(Recomputed(decoder, rows=1))
    assert plain < blockwise <= plain + forward
    conv_out = vae.decoder.conv_out
    last_conv = flops.count_flops(lambda: conv_out(torch.zeros(3, conv_out.in_channels, 16, 16)))
    assert 0 < last_conv < forward / 10
    assert sliced - blockwise == forward - last_conv


def test_checkpointing_has_the_public_codes_granularity():
    """baseline.checkpointed: resnets and whole attention modules of the down/up blocks keep only their inputs (the
    public code's diffusers 0.19.3), less than the installed diffusers' own checkpointing keeps; the output and the
    gradient are those without checkpointing, and the U-Net's modules are restored afterwards."""
    import flops
    from baseline import checkpointed
    from fastfair.memory_budget import saved_tensor_bytes
    from fastfair.testing import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(cross_attention_dim=16).requires_grad_(False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    emb = torch.randn(2, 5, 16, requires_grad=True)
    call = lambda: unet(x, t, encoder_hidden_states=emb).sample  # noqa: E731
    held = [*unet.parameters(), x, t, emb]
    modules_before = dict(unet.named_modules())
    plain_out = call()
    plain_grad, = torch.autograd.grad(plain_out.square().sum(), emb)
    with checkpointed(unet):
        # the public code's diffusers 0.19.3 checkpointed no mid block and no inner transformer block
        assert unet.down_blocks[0].gradient_checkpointing and not unet.mid_block.gradient_checkpointing
        assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules()
                       if hasattr(m, "transformer_blocks"))
        public = saved_tensor_bytes(call, held)
        out = call()
        grad, = torch.autograd.grad(out.square().sum(), emb)
    assert dict(unet.named_modules()) == modules_before and not unet.down_blocks[0].gradient_checkpointing
    unet.enable_gradient_checkpointing()
    for module in unet.mid_block.modules():  # as in 0.19.3: then the two differ in the down/up attention only
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    installed = saved_tensor_bytes(call, held)
    unet.disable_gradient_checkpointing()
    assert 0 < public < installed < saved_tensor_bytes(call, held)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, plain_grad)
    # the FLOP model's Ur: what the checkpointed backward recomputes, part of one forward
    backward = flops.count_input_backward_flops(call, [emb])
    with checkpointed(unet):
        recompute = flops.count_input_backward_flops(call, [emb]) - backward
    assert 0 < recompute < flops.count_flops(call)
    assert emb.grad is None  # the count leaves no gradient behind


@pytest.mark.parametrize("argv, message", [
    (["--impls", "foo"], "--impls 'foo': unknown foo (choose from baseline_sdpa"),
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),  # an IndexError once the models were saved
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--sweep-steps", "5,0"], "comma-separated counts >= 1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),  # failed in the worker, after the models were saved
    (["--resolution", "-16"], "--resolution -16: a positive multiple of 2"),
    (["--resolution", "0"], "--resolution 0: a positive multiple of 2"),  # meant the default
    (["--resolution", "15"], "--resolution 15: a positive multiple of 2"),  # rounded down
])
def test_train_step_cli_names_the_bad_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--model", "tiny", *argv])
    assert message in capsys.readouterr().err


def test_saved_models_of_another_kind_are_refused_not_benchmarked_under_this_name(tmp_path):
    """--models-dir shared between runs: tiny models were loaded and reported as sd15 ones."""
    (tmp_path / "paths.json").write_text(json.dumps({"kind": "tiny", "resolution": 16, "paths": {"unet": "u"}}))
    assert train_step.models_on_disk("tiny", tmp_path, 16) == {"unet": "u"}
    with pytest.raises(SystemExit, match="holds tiny models, not sd15 ones: give another --models-dir"):
        train_step.models_on_disk("sd15", tmp_path, 512)
    (tmp_path / "paths.json").write_text(json.dumps({"unet": "u"}))  # as an older bench wrote it
    with pytest.raises(SystemExit, match="holds models of an older bench"):
        train_step.models_on_disk("tiny", tmp_path, 16)


@pytest.mark.parametrize("argv, message", [(["--images", "0"], "--images must be >= 1, got 0"),
                                           (["--steps", "0"], "--steps must be >= 1, got 0"),
                                           (["--threads", "0"], "--threads must be >= 1, got 0"),
                                           (["--out", "FILE"], "a file; give a folder"),  # not after training
                                           (["--out", "FILE/sub"], "FILE is a file; give a folder")])
def test_engine_demo_cli_names_the_bad_flag(argv, message, capsys, tmp_path):
    from fastfair import engine_demo

    (tmp_path / "FILE").write_text("")
    argv = [arg.replace("FILE", str(tmp_path / "FILE")) for arg in argv]
    with pytest.raises(SystemExit):
        engine_demo.main(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert "python -m fastfair.engine_demo: error: " in err and message.replace("FILE", str(tmp_path / "FILE")) in err


def test_engine_demo_writes_a_diverged_runs_loss_as_null(tmp_path):
    """A learning rate that blows the run up: metrics.json stays strict JSON (NaN was written bare)."""
    import json
    import math

    from fastfair import engine_demo

    threads = torch.get_num_threads()
    try:  # --threads is torch's count (it was capped at 2 without a word)
        metrics = engine_demo.main(["--out", str(tmp_path), "--iters", "2", "--steps", "2", "--images", "1",
                                    "--lr", "1e30", "--threads", "3"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert math.isnan(metrics["colour_loss_after"])
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)[
        "colour_loss_after"] is None


def test_the_summary_counts_per_image_and_the_baseline_s_micro_batches():
    """s_per_image is s_per_iter over the images; the FLOP model gets the baseline's gradient passes, one per
    started micro-batch (3 images in passes of 2: 2 passes), fastfair's one."""
    import flops

    unit = dict(unet=100, unet_input_backward=100, vae_decode=7, judges=5, embed=3, text=1)
    runs = [{"impl": impl, "s_per_iter_samples": [seconds], "phases_samples": {}, "peak_bytes": 100,
             "micro_batch": 2 if impl == "baseline_sdpa" else None}
            for impl, seconds in (("baseline_sdpa", 6.0), ("fastfair", 3.0))]
    args = argparse.Namespace(model="tiny", images=3, steps=4, dtype="auto")
    rows = train_step.summarize(runs, args, {"unit_flops": unit, "matmul_flops_per_s": 1e3})
    assert [row["s_per_image"] for row in rows] == [2.0, 1.0]
    assert rows[0]["model_flops"] == flops.iteration_flops("baseline_sdpa", unit, 3, 4, 2)
    assert rows[1]["model_flops"] == flops.iteration_flops("fastfair", unit, 3, 4, 1)
    assert rows[1]["speedup_per_image_vs_baseline_sdpa"] == 2.0


def test_peak_ratios_are_left_blank_where_a_cpu_run_s_resident_set_did_not_grow():
    runs = [{"impl": impl, "s_per_iter_samples": [1.0], "phases_samples": {}, "peak_bytes": peak, "micro_batch": 2,
             "device": "cpu", "latent": [4, 8, 8]} for impl, peak in (("baseline_sdpa", 0), ("fastfair", -4096))]
    args = argparse.Namespace(model="tiny", images=2, steps=3, dtype="auto")
    rows = train_step.summarize(runs, args, {})
    assert [row["peak_vs_baseline_sdpa"] for row in rows] == [None, None]
    table = train_step.markdown(rows, [], {"device": "cpu", "model": "tiny", "images": 2, "steps": 3, "latent": [4],
                                           "date": "today", "rounds": 1})
    assert all("| - |" in line for line in table.splitlines() if line.startswith(("| baseline_sdpa", "| fastfair")))


def test_engine_demo_colour_loss_is_the_mean_over_images_of_the_squared_colour_distance():
    from fastfair import engine_demo

    assert engine_demo.TARGET_RGB == (0.6, -0.2, -0.4)
    colours = torch.tensor([[0.6, -0.2, -0.4], [0.0, 0.0, 0.0]])
    images = colours[:, :, None, None].expand(2, 3, 4, 5).clone()
    images[1, :, 0, 0] = 0.5  # the image's mean colour counts, not a pixel: 0.025 in each channel
    distance = (0.025 - 0.6) ** 2 + (0.025 + 0.2) ** 2 + (0.025 + 0.4) ** 2  # summed over the channels
    assert engine_demo.colour_loss(images).item() == pytest.approx((0 + distance) / 2)
    assert engine_demo.colour_loss(images[:1]).item() == pytest.approx(0.0, abs=1e-12)


def test_engine_demo_grid_puts_before_over_after_image_by_image(tmp_path):
    import numpy as np
    from PIL import Image

    from fastfair import engine_demo

    levels = torch.linspace(-1, 1, 6)  # 2 rows of 3 images, each one grey level, 4 x 2 pixels
    images = levels[:, None, None, None].expand(6, 3, 4, 2)
    engine_demo._save_grid(images, 3, str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4 * 4, 3 * 2 * 4, 3)  # each image scaled 4 x
    for index, level in enumerate(levels):
        row, column = divmod(index, 3)
        block = grid[row * 16:(row + 1) * 16, column * 8:(column + 1) * 8]
        assert (block == round((level.item() + 1) * 127.5)).all(), index


def test_engine_demo_reports_the_relative_reduction_of_its_loss(tmp_path):
    import json

    from fastfair import engine_demo

    metrics = engine_demo.main(["--out", str(tmp_path), "--iters", "1", "--steps", "1", "--images", "3"])
    assert metrics["colour_loss_after"] != metrics["colour_loss_before"]
    before, after = metrics["colour_loss_before"], metrics["colour_loss_after"]
    assert metrics["relative_reduction"] == pytest.approx(1 - after / before)
    assert json.loads((tmp_path / "metrics.json").read_text())["relative_reduction"] == metrics["relative_reduction"]
    untrained = engine_demo.main(["--out", str(tmp_path / "none"), "--iters", "0", "--steps", "1", "--images", "3"])
    assert untrained["iterations"] == 0 and untrained["colour_loss_after"] == untrained["colour_loss_before"]


def test_the_summary_takes_medians_and_ratios_against_baseline_sdpa():
    """s_per_iter is the median of every timed iteration of an impl (a stalled iteration does not move it),
    peak_bytes the median over its rounds; speedup, peak and FLOP ratios are baseline_sdpa over / under the row's
    as the issue's targets read them (lean: peak <= 0.5x, speed >= 1.1x), and each row sits under its header."""
    unit = dict(unet=100, unet_input_backward=100, unet_recompute=50, vae_decode=7, judges=5, embed=3, text=1)
    runs = [{"impl": impl, "s_per_iter_samples": samples, "phases_samples": {"sampling": samples},
             "peak_bytes": peak, "micro_batch": 2} for impl, samples, peak in (
        ("baseline_sdpa", [4.0, 4.0, 40.0], 400 * 2**20), ("fastfair", [2.0, 30.0], 100 * 2**20),
        ("fastfair", [2.0], 300 * 2**20), ("fastfair", [2.0], 200 * 2**20))]
    args = argparse.Namespace(model="tiny", images=2, steps=4, dtype="auto")
    rows = train_step.summarize(runs, args, {"unit_flops": unit, "matmul_flops_per_s": 1e3})
    base, ours = rows
    assert (base["s_per_iter"], ours["s_per_iter"]) == (4.0, 2.0) and ours["timed_iterations"] == 4
    assert (base["peak_bytes"], ours["peak_bytes"]) == (400 * 2**20, 200 * 2**20)
    assert ours["speedup_per_image_vs_baseline_sdpa"] == 2.0 and ours["peak_vs_baseline_sdpa"] == 0.5
    total = ours["model_flops"]["total"]
    assert ours["model_speedup_vs_baseline_sdpa"] == base["model_flops"]["total"] / total > 1
    assert ours["floor_s"] == total / 1e3 and ours["s_over_floor"] == 2.0 / ours["floor_s"]
    assert ours["achieved_flops_per_s"] == total / 2.0  # per iteration, as the floor
    table = train_step.markdown(rows, [], {"device": "cpu", "model": "tiny", "images": 2, "steps": 4,
                                           "latent": [4], "date": "today", "rounds": 1})
    lines = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    header, fastfair = [c.strip() for c in lines[0]], dict(zip([c.strip() for c in lines[0]], lines[2]))
    assert header[:7] == ["impl", "s/iter", "s/image", "speedup vs baseline_sdpa", "FLOP-model speedup", "peak MiB",
                          "peak / baseline_sdpa"]
    assert [fastfair[h].strip() for h in header[:7]] == [
        "fastfair", "2.000", "1.000", "2.00", f"{ours['model_speedup_vs_baseline_sdpa']:.2f}", "200.0", "0.500"]
    assert fastfair["s / floor"].strip() == f"{ours['s_over_floor']:.1f}"


def test_largest_batch_follows_the_two_largest_batches():
    sweep = [{"impl": "fastfair", "images": n, "steps": 20, "peak_bytes": p} for n, p in ((1, 110), (2, 120), (4, 200))]
    assert train_step.largest_batch(sweep, "fastfair", 20, 400) == 9  # slope 40 from 2 to 4 images


def test_cuda_phases_are_timed_between_synchronisations(monkeypatch):
    """CUDA work is queued: a phase read without a synchronize at both ends times the launches, not the work."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    timer = train_step.PhaseTimer("cuda")
    with timer("sampling"):
        events.append("work")
    assert events == ["sync", "work", "sync"] and timer.seconds["sampling"] >= 0


def test_a_cpu_run_takes_its_peak_from_the_memory_worker_and_its_times_from_the_timed_one(monkeypatch):
    """On CPU the timed worker's resident set is no measure (default allocator): the peak and the kept-step
    probes come from the memory worker (worker_env), everything else from the timed one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spawned = []

    def spawn(cfg, env):
        spawned.append(cfg["iters"])
        if cfg["iters"] == 0:
            return {"impl": "fastfair", "peak_bytes": 111, "kept_graph_bytes": 5, "keeps_for_budget": [1, 2],
                    "s_per_iter_samples": []}
        return {"impl": "fastfair", "peak_bytes": 999, "s_per_iter_samples": [1.0, 2.0]}

    monkeypatch.setattr(train_step, "_spawn", spawn)
    result = train_step.run_worker({"impl": "fastfair", "iters": 2})
    assert spawned == [0, 2]
    assert result == {"impl": "fastfair", "peak_bytes": 111, "kept_graph_bytes": 5, "keeps_for_budget": [1, 2],
                      "s_per_iter_samples": [1.0, 2.0]}


@pytest.mark.parametrize("impl, classic, recomputed", [
    ("baseline", True, False), ("baseline_sdpa", False, False), ("fastfair", False, True)])
def test_the_worker_times_only_the_iterations_after_warm_up(monkeypatch, impl, classic, recomputed):
    """Warm-up iterations are neither timed nor inside the peak's window; the classic attention goes to the
    ``baseline`` impl only, the recomputed judges to fastfair's."""
    events = []

    unet = SimpleNamespace(config=SimpleNamespace(in_channels=4))
    optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None, step=lambda: events.append("step"))
    monkeypatch.setattr(train_step, "load_setup", lambda *a: (SimpleNamespace(unet=unet), None, None, optimizer))
    monkeypatch.setattr(train_step, "PeakMemory", recording_peak_memory(events, 7))
    monkeypatch.setattr(train_step, "set_classic_attention", lambda u: events.append("classic"))
    monkeypatch.setattr(train_step, "recompute_objective", lambda o, rows: events.append("recompute"))
    for step in ("baseline_step", "fastfair_step"):
        monkeypatch.setattr(train_step, step, lambda *a, **k: None)
    threads = torch.get_num_threads()
    try:
        result = train_step.worker({"impl": impl, "steps": 2, "images": 1, "paths": {}, "lora_rank": 4, "dtype": "fp32",
                                    "latent": 2, "threads": 1, "warmup": 2, "iters": 3, "model": "tiny"})
    finally:
        torch.set_num_threads(threads)
    setup = ["classic"] * classic + ["recompute"] * recomputed
    assert events == setup + ["step", "step", "start", "step", "step", "step", "peak"]
    assert len(result["s_per_iter_samples"]) == 3 and result["peak_bytes"] == 7
    assert all(len(v) == 3 for v in result["phases_samples"].values())


def test_the_flop_model_refit_gives_baseline_sdpa_over_each_impl(tmp_path, monkeypatch):
    """bench/refit_flop_model.py: a table's FLOP model with the measured Ur, the baseline's gradient passes one per
    started micro-batch, and each impl's model speedup baseline_sdpa's FLOPs over its own."""
    import flops
    import refit_flop_model

    unit = dict(unet=100, unet_input_backward=100, unet_recompute=80, vae_decode=7, judges=5, embed=3, text=1)
    monkeypatch.setattr(refit_flop_model, "unet_units",
                        lambda model, latent: dict(unet=100, unet_input_backward=100, unet_recompute=50))
    table = {"meta": {"model": "tiny", "latent": [4, 8, 8], "images": 3, "steps": 4, "unit_flops": unit}, "runs": [],
             "results": [{"impl": impl, "micro_batch": micro, "speedup_per_image_vs_baseline_sdpa": speedup}
                         for impl, micro, speedup in (("baseline_sdpa", 2, 1.0), ("fastfair", 3, 1.5))]}
    (tmp_path / "table.json").write_text(json.dumps(table))
    threads = torch.get_num_threads()
    try:
        refit_flop_model.main([str(tmp_path / "table.json"), "--json", str(tmp_path / "refit.json")])
    finally:
        torch.set_num_threads(threads)
    base, ours = json.loads((tmp_path / "refit.json").read_text())["results"]
    new = dict(unit, unet_recompute=50)
    assert base["new_flops"] == flops.iteration_flops("baseline_sdpa", new, 3, 4, 2, 0, None, 0)["total"]
    assert base["old_flops"] == flops.iteration_flops("baseline_sdpa", unit, 3, 4, 2, 0, None, 0)["total"]
    assert ours["new_flops"] == flops.iteration_flops("fastfair", new, 3, 4, 1, 0, None, 0)["total"]
    assert ours["new_model_speedup"] == base["new_flops"] / ours["new_flops"] > 1
    assert ours["old_model_speedup"] == base["old_flops"] / ours["old_flops"] > ours["new_model_speedup"]
    assert "| fastfair | 1.500 |" in (tmp_path / "refit.md").read_text()


def test_a_ratio_with_nothing_to_compare_against_is_blank_not_zero():
    """Without baseline_sdpa in --impls, or without a FLOP model (the first run counts it), the ratio and FLOP
    columns have nothing to show: "-", where a 0.00 read as a measured speedup of zero."""
    runs = [{"impl": "baseline", "s_per_iter_samples": [2.0], "phases_samples": {"sampling": [1.0]},
             "peak_bytes": 2**20, "micro_batch": 1}]
    args = argparse.Namespace(model="tiny", images=1, steps=4, dtype="auto")
    table = train_step.markdown(train_step.summarize(runs, args, {}), [], {
        "device": "cpu", "model": "tiny", "images": 1, "steps": 4, "latent": [4], "date": "today", "rounds": 1})
    lines = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    row = dict(zip([c.strip() for c in lines[0]], [c.strip() for c in lines[1]]))
    assert row["impl"] == "baseline" and row["s/iter"] == "2.000" and row["sampling s"] == "1.000"
    for column in ("speedup vs baseline_sdpa", "FLOP-model speedup", "peak / baseline_sdpa", "model TFLOP",
                   "achieved TFLOP/s", "floor s", "s / floor"):
        assert row[column] == "-", (column, row[column])


def test_train_step_at_sigterm_ends_with_status_143_and_removes_its_model_folder(tmp_path):
    """gpu_check.sh runs it under `timeout`, which sends SIGTERM: Python's default action ended the process at
    once, leaving the random-weight models it wrote to a temporary folder (gigabytes for sd15) and possibly a
    report's temporary file. Under sigterm_as_exit the folder is removed on the way out."""
    import signal
    import subprocess
    import time

    from child_env import child_env

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.Popen([sys.executable, str(BENCH / "train_step.py"), "--model", "tiny", "--images", "1",
                            "--steps", "2", "--rounds", "50", "--impls", "baseline", "--json", str(tmp_path / "t.json")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(TMPDIR=str(scratch)))
    deadline = time.monotonic() + 180
    while not list(scratch.glob("fastfair-bench-*/paths.json")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the models are on disk: main is past its imports, under its handler
    assert list(scratch.glob("fastfair-bench-*/paths.json")), run.stderr.read().decode()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.stderr.read().decode()
    assert not list(scratch.glob("fastfair-bench-*")) and not list(tmp_path.glob(".tmp-*"))
