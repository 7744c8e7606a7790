"""The benchmark's own tools: metrics against known values, the MAC counter against a
hand-counted block, the reference model (ComfyUI's FLUX class, trained weights), the
training forward against ComfyUI's forward, and the quick benchmark end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import require

from benchmarks.metrics import psnr, ssim


def test_psnr_known_values():
    a = torch.zeros(4, 4)
    b = torch.full((4, 4), 0.1)
    assert psnr(a, b) == pytest.approx(20.0)          # mse 0.01 -> 20 dB
    assert psnr(b, b) == float("inf")
    assert psnr(a, b, peak=2.0) == pytest.approx(20.0 + 20 * math.log10(2))


def test_ssim_matches_the_reference_implementation():
    skm = require("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 64, generator=g)
    b = (a + 0.1 * torch.randn(64, 64, generator=g)).clamp(0, 1)
    expected = skm.structural_similarity(a.numpy(), b.numpy(), data_range=1.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=True)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 1 - a) < 0


def test_forecast_lab_fits_the_learned_weights_that_made_the_calibration_runs():
    """The lab's ``learned`` scheme (L2P): where each forecast step's noise is a fixed mix of the
    computed steps before it in every calibration run, the least-squares fit gives that mix back;
    steps with fewer than two computed steps before them, and computed steps, get none."""
    from benchmarks.lab.forecast_lab import fit_learned_weights
    g = torch.Generator().manual_seed(0)
    computed = {0, 3, 7}
    mixes = {4: [0.5, 1.5], 5: [-1.0, 2.0], 6: [0.25, 0.75], 8: [0.1, -0.3, 1.2], 9: [0.0, -1.0, 2.0]}
    runs = []
    for _ in range(3):
        noise = {c: torch.randn(4, 8, 8, generator=g) for c in computed}
        noise.update({j: torch.randn(4, 8, 8, generator=g) for j in (1, 2)})
        for j, mix in mixes.items():
            sources = [c for c in sorted(computed) if c < j][-3:]
            noise[j] = sum(w * noise[c] for w, c in zip(mix, sources))
        runs.append([noise[i] for i in range(10)])
    weights = fit_learned_weights(runs, computed, 10)
    assert sorted(weights) == sorted(mixes)
    for j, mix in mixes.items():
        sources, fitted = weights[j]
        assert sources == [c for c in sorted(computed) if c < j][-3:]
        assert fitted == pytest.approx(mix, abs=1e-6)


@pytest.mark.comfy
def test_mac_counter_against_a_hand_counted_block(spec_nodes):
    import comfy.ops
    from comfy.ldm.flux.layers import SingleStreamBlock
    from comfy.ldm.flux.layers import EmbedND
    from benchmarks.metrics import MacCounter
    h, heads, L, B = 32, 2, 10, 3
    blk = SingleStreamBlock(h, heads, mlp_ratio=4.0, operations=comfy.ops.disable_weight_init)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(B, L, h)
    vec = torch.randn(B, h)
    ids = torch.zeros(B, L, 3)
    ids[..., 1] = torch.arange(L)
    pe = EmbedND(dim=h // heads, theta=10000, axes_dim=[4, 6, 6])(ids)
    counter = MacCounter(blk, [blk])
    with torch.no_grad():
        blk(x, vec=vec, pe=pe)
    counter.close()
    m = 4 * h
    hand = (B * h * 3 * h                 # modulation: vec -> shift, scale, gate
            + B * L * h * (3 * h + m)     # linear1: qkv and mlp in
            + B * L * (h + m) * h         # linear2: proj and mlp out
            + 2 * B * L * L * h)          # attention: q k^T and attn v over all heads
    assert counter.total == hand


@pytest.mark.comfy
def test_training_forward_matches_comfyui_forward(spec_nodes):
    from devkit import reference_model as rm
    patcher = rm.load_reference()
    dm = patcher.model.diffusion_model
    ctx, pooled = rm.class_embeddings()
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        ours = rm.train_forward(dm, x, t, ctx[:2], pooled[:2])
        comfy = dm(x, t, ctx[:2], y=pooled[:2], transformer_options={})
    assert torch.allclose(ours, comfy, atol=1e-5, rtol=1e-4)


@pytest.mark.comfy
def test_reference_model_loads_through_comfy_flux_config(spec_nodes):
    import comfy.model_base
    import comfy.supported_models
    from devkit import reference_model as rm
    patcher = rm.load_reference()
    assert isinstance(patcher.model, comfy.model_base.Flux)
    assert isinstance(patcher.model.model_config, comfy.supported_models.Flux)
    cfg = rm.read_config()
    assert cfg["unet_config"] == rm.UNET_CONFIG
    n_tokens = (32 // 2) ** 2
    assert n_tokens >= 256
    blocks = len(patcher.model.diffusion_model.double_blocks) + len(patcher.model.diffusion_model.single_blocks)
    assert blocks >= 6
    assert rm.WEIGHTS.stat().st_size <= 20 * 2**20


def _descriptor(img):
    """Image statistics that tell the photographs apart: brightness, contrast, edge energy
    along each axis, low-frequency power share, shadow and highlight fractions."""
    x = img[:, 0].double()
    gx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))
    gy = (x[:, 1:, :] - x[:, :-1, :]).abs().mean((1, 2))
    f = torch.fft.rfft2(x - x.mean((1, 2), keepdim=True)).abs() ** 2
    low = f[:, :8, :8].sum((1, 2)) / f.sum((1, 2))
    return torch.stack([x.mean((1, 2)), x.std((1, 2)), gx, gy, low,
                        (x < 0.2).double().mean((1, 2)), (x > 0.8).double().mean((1, 2))], 1)


@pytest.mark.comfy
def test_the_held_out_wan_reference_is_another_family_on_other_data(spec_nodes):
    """The third reference model (nothing is tuned on it): ComfyUI's own Wan 2.1 class, built by
    its WAN21_T2V config, trained on photographs none of the FLUX references saw."""
    import comfy.model_base
    from devkit import reference_model as rm
    patcher = rm.load_reference("reference_wan")
    assert isinstance(patcher.model, comfy.model_base.WAN21)
    cfg = rm.read_config("reference_wan")
    assert cfg["unet_config"] == json.loads(json.dumps(rm.WAN_UNET_CONFIG)) and cfg["classes"] == rm.HELD_OUT_CLASSES
    assert not set(rm.HELD_OUT_CLASSES) & set(rm.CLASSES)
    assert len(patcher.model.diffusion_model.blocks) == 6
    assert rm.model_files("reference_wan")[0].stat().st_size <= 20 * 2**20


@pytest.mark.comfy
def test_the_held_out_wan_reference_samples_its_classes_brightness(spec_nodes):
    """The Wan reference's samples have little spatial structure (docs/results.md), but what it
    learned of each class shows: each class's mean brightness within 0.05 of its training crops'."""
    require("skimage")
    from devkit import reference_model as rm
    name = "reference_wan"
    photos = rm.load_photos(name)
    g = torch.Generator().manual_seed(5)
    real = torch.stack([rm.random_crops(photos, torch.full((32,), c), g)[:, 0].mean() for c in range(8)])
    labels = [c for c in range(8) for _ in range(2)]
    images = rm.sample(rm.load_reference(name), labels, [900 + i for i in range(16)], name=name)
    sampled = images[:, 0].mean((1, 2)).reshape(8, 2).mean(1)
    assert (sampled - real).abs().max() < 0.05, (real.tolist(), sampled.tolist())
    assert real.max() - real.min() > 0.4          # the classes differ by far more than that


@pytest.mark.comfy
@pytest.mark.parametrize("name,least", [("reference", 0.6)])
def test_reference_model_samples_look_like_their_training_class(spec_nodes, name, least):
    """Sampled through ComfyUI's real sampler, each sample's statistics are nearest to the
    real crops of its own class far more often than chance (1/8)."""
    skimage = require("skimage")  # the training photographs ship with scikit-image
    del skimage
    from devkit import reference_model as rm
    photos = rm.load_photos(name)
    g = torch.Generator().manual_seed(5)
    k = len(rm.MODELS[name]["classes"])
    real = torch.cat([_descriptor(rm.random_crops(photos, torch.full((32,), c), g)) for c in range(k)])
    mu, sd = real.mean(0), real.std(0)
    centroids = ((real - mu) / sd).reshape(k, 32, -1).mean(1)
    labels = [c for c in range(k) for _ in range(2)]
    images = rm.sample(rm.load_reference(name), labels, [900 + i for i in range(len(labels))], name=name)
    assert images.shape == (16, 1, 128, 128) and images.min() >= 0 and images.max() <= 1
    nearest = torch.cdist((_descriptor(images) - mu) / sd, centroids).argmin(1)
    accuracy = (nearest == torch.tensor(labels)).double().mean().item()
    assert accuracy >= least, (nearest.tolist(), labels)


@pytest.mark.comfy
def test_quick_benchmark_end_to_end(spec_nodes, tmp_path):
    """The harness's quick mode (the CI smoke test): every method on the reference model,
    measured, reported as JSON, Markdown and a plot."""
    from benchmarks import run_benchmark as rb
    workload = rb.reference_workload(4, 28, 2.0)
    result = rb.benchmark(workload, True, rb.block_plan(workload.model), log=lambda *a: None,
                          timing_samples=1, timing_repeats=1)
    rows = result["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"none", "reuse", "fbcache", "easycache", "lazycache", "taylorseer", "speca"}
    assert [r["method"] for r in rows if r["settings"].get("defaults")] == ["speca"]   # the node as dropped in
    none = next(r for r in rows if r["method"] == "none")
    assert none["compute_fraction"] == pytest.approx(1.0) and none["psnr_db"] == 100.0 and none["ssim"] == 1.0
    for r in rows:
        for key in ("method", "settings", "compute_fraction", "speedup", "psnr_db", "ssim", "cache_bytes",
                    "verify_fraction"):
            assert key in r, key
        if r["method"] != "none":
            assert r["compute_fraction"] < 1.0 and r["psnr_db"] < 100.0, r
            assert r["speedup"] > 0
        if r["method"] == "speca":
            # lookback (the node's default) runs no probe; the probe's rows pay for theirs
            assert r["cache_bytes"] > 0
            assert r["acceptance"] == ("lookback" if r["settings"].get("defaults") else "probe"), r
            assert (r["verify_fraction"] > 0) == (r["acceptance"] == "probe")
        if r["method"] in ("reuse", "taylorseer"):
            assert r["verify_fraction"] == 0
    (tmp_path / "r.json").write_text(json.dumps(result))
    md = rb.markdown(result)
    assert md.count("\n| ") == len(rows) + 1
    rb.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


@pytest.mark.comfy
def test_recipe_loads_any_comfy_model_file(spec_nodes, tmp_path):
    """The harness's "any model" path: a diffusion-model file plus a recipe. Here the
    reference weights with an explicit unet_config (ComfyUI cannot auto-detect a small
    FLUX) and class-label conditioning; real FLUX uses text encoders instead."""
    from devkit import reference_model as rm
    from benchmarks import run_benchmark as rb
    recipe = {"model": str(rm.WEIGHTS), "unet_config": rm.UNET_CONFIG, "model_config": "Flux",
              "conditioning": "reference_classes", "seeds": [1, 2], "latent": [1, 16, 32, 32],
              "steps": 6, "cfg": 2.0}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(recipe))
    workload = rb.recipe_workload(path)
    assert workload.steps == 6 and len(workload.samples) == 2 and workload.decode is None
    ref_sd = rm.load_reference().model.diffusion_model.state_dict()
    for k, v in workload.model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, ref_sd[k])
    row, images = rb.run_method(workload, rb.Method("none", {}, lambda m: m), rb.Probe(workload))
    assert len(images) == 2 and images[0].shape == (1, 16, 32, 32) and row["macs"] > 0


@pytest.mark.comfy
def test_training_resumes_from_its_checkpoint_with_the_same_result(spec_nodes, tmp_path):
    """A session can end in the middle of training: stopping at step 2 and rerunning gives
    the same weights as an uninterrupted 4-step run."""
    from safetensors.torch import load_file
    from devkit import train_reference as tr
    common = ["--steps", "4", "--batch", "2", "--checkpoint-every", "100"]
    assert tr.main(common + ["--out", str(tmp_path / "straight"), "--checkpoint-dir", str(tmp_path / "c1")]) == 0
    split = common + ["--out", str(tmp_path / "split"), "--checkpoint-dir", str(tmp_path / "c2")]
    assert tr.main(split + ["--stop-after", "2"]) == 0
    assert (tmp_path / "c2" / "checkpoint.pt").is_file() and not (tmp_path / "split").exists()
    assert tr.main(split) == 0
    a = load_file(str(tmp_path / "straight" / "flux_tiny.safetensors"))
    b = load_file(str(tmp_path / "split" / "flux_tiny.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.comfy
def test_forecast_lab_gives_the_engines_picture_at_the_engines_schedule(spec_nodes, stats_log):
    """benchmarks.forecast_lab compares forecast schemes at a fixed schedule; its ``noise`` scheme
    (with the trajectory correction) must be what the node's linear forecast does, so that its
    numbers stand for the node's: at the schedule a 4x speed target with the linear forecast took
    (order 1 set on the Options node, which turns the fitted curvature off; a planned target), the
    same picture.
    Every step computed gives the uncached one."""
    from benchmarks.lab import forecast_lab as lab
    from devkit import reference_model as rm
    from conftest import simple
    model = rm.load_reference()
    labels, seeds = [2], [1001]
    uncached = rm.sample(model, labels, seeds, steps=28)
    assert torch.equal(rm.sample(model, labels, seeds, sampler=lab.lab_sampler(set(range(28)), "noise")), uncached)
    linear = spec_nodes.SpeculativeCacheOptions.execute(order=1).result[0]
    engine = rm.sample(simple(spec_nodes, model, mode="speed_target", speed=0.75, options=linear), labels, seeds,
                       steps=28)
    s = stats_log[-1]
    computed = {i for i, letter in enumerate(s["timeline"]) if letter == "C"}
    assert s["corrected"] > 0 and s["forecast"] > 15 and len(computed) == 28 - s["forecast"]
    lab_images = rm.sample(model, labels, seeds, sampler=lab.lab_sampler(computed, "noise"))
    assert rm.psnr(lab_images, engine) > 80              # the same picture, up to float rounding
    assert rm.psnr(lab_images, uncached) < 60            # (and not the uncached one)
    # uncond forecast apart (--uncond-schedule): every step's uncond used is the uncached picture
    # again (up to the rounding of x - (x - cfg)); uncond at the engine's steps only is not
    every = set(range(28))
    kept = rm.sample(model, labels, seeds, sampler=lab.lab_sampler(every, "noise", 0, uncond_computed=every))
    assert rm.psnr(kept, uncached) > 80
    apart = rm.sample(model, labels, seeds, sampler=lab.lab_sampler(every, "noise", 0, uncond_computed=computed))
    assert 20 < rm.psnr(apart, uncached) < 60
    with pytest.raises(ValueError, match="no-correction"):
        lab.lab_sampler(every, "noise", 2, uncond_computed=computed)
    # uncond from cond and the last difference (the engine's cond-only steps): the same picture
    # when uncond runs at every step, a changed one when it runs at the engine's steps only
    derived = rm.sample(model, labels, seeds, sampler=lab.lab_sampler(every, "noise", 0, uncond_computed=every,
                                                                      uncond_from_difference=True))
    assert rm.psnr(derived, uncached) > 80
    derived = rm.sample(model, labels, seeds, sampler=lab.lab_sampler(every, "noise", 0, uncond_computed=computed,
                                                                      uncond_from_difference=True))
    assert 20 < rm.psnr(derived, uncached) < 60 and not torch.equal(derived, apart)


@pytest.mark.comfy
def test_the_l2p_row_runs_the_model_at_its_schedule_and_its_learned_weights_beat_a_reuse(spec_nodes):
    """benchmarks.learned_predictor (the L2P-style peer): calibration runs compute every step; the
    row computes exactly the planned steps of each picture (compute = calls / steps, as the MAC
    count of the benchmark sees it); the fitted weights give the calibration runs' forecast steps
    more closely than reusing the last computed step, and the row's pictures keep more of the
    uncached ones than that reuse at the same schedule (4 pictures, 12 steps, 6-block model:
    31.2 against 29.4 dB)."""
    from benchmarks import learned_predictor as lp
    from benchmarks import run_benchmark as rb
    workload = rb.reference_workload(4, 12, 2.0, "reference")
    probe = rb.Probe(workload)
    base, uncached = rb.run_method(workload, rb.Method("none", {}, lambda m: m), probe)
    predictor = lp.LearnedPredictor(3.0, calibration=2)
    row, images = rb.run_method(workload, rb.Method("l2p", predictor.settings(), predictor.apply,
                                                    predictor.prepare), probe, uncached)
    wrapper = predictor.wrapper
    schedule = sorted(wrapper.schedule)
    assert len(schedule) == 4 and schedule[0] == 0 and schedule[-1] == 11
    assert wrapper.calls == schedule * 4                   # four pictures, the planned steps each
    assert sorted(wrapper.weights) == [j for j in range(12) if j not in wrapper.schedule]
    assert row["macs"] / base["macs"] == pytest.approx(4 / 12, abs=1e-9)
    calibration = [runs for key, runs in lp._CALIBRATIONS.items() if key[0] == id(workload.model)][0]
    assert len(calibration) == 2 and all(len(run) == 12 for run in calibration)
    for j, (sources, weights) in wrapper.weights.items():      # (least squares over both runs)
        learned = sum(((sum(w * run[c] for w, c in zip(weights, sources)) - run[j]) ** 2).sum() for run in calibration)
        reused = sum(((run[sources[-1]] - run[j]) ** 2).sum() for run in calibration)
        assert learned < reused, (j, learned, reused)
    # the same schedule, each forecast step the last computed step's noise again
    reuse = lp._StepWrapper(wrapper.sigmas, wrapper.schedule,
                            {j: ([sources[-1]], [1.0]) for j, (sources, _) in wrapper.weights.items()})
    reused, _ = rb.run_method(workload, rb.Method("reuse", {}, lambda m: _installed(m, reuse)), probe, uncached)
    assert reuse.calls == schedule * 4
    assert 20 < row["psnr_db"] < 80
    assert row["psnr_db"] > reused["psnr_db"] + 1.0, (row["psnr_db"], reused["psnr_db"])


def _installed(model, wrapper):
    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m
