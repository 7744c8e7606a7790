"""Tiny ComfyUI models built through ComfyUI's own config classes (random weights).

They exercise the real model code, hooks and sampler on the CPU in milliseconds; they
say nothing about quality (random weights have no learned dynamics)."""

from __future__ import annotations

import torch

CONFIGS = {
    "flux": dict(
        cls="Flux", latent=(1, 16, 16, 16),
        unet=dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                  hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
                  axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}),
    "chroma": dict(
        cls="Chroma", latent=(1, 16, 16, 16),
        unet=dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64,
                  hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
                  axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True,
                  in_dim=64, out_dim=64, hidden_dim=32, n_layers=1),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}),
    "hunyuan_video": dict(
        cls="HunyuanVideo", latent=(1, 16, 3, 8, 8),
        unet=dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32,
                  context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2,
                  depth_single_blocks=2, axes_dim=[4, 6, 6], theta=256, patch_size=[1, 2, 2],
                  qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 6.0}),
    "wan21": dict(
        cls="WAN21_T2V", latent=(1, 16, 3, 8, 8),
        unet=dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16,
                  dim=64, ffn_dim=128, freq_dim=256, text_dim=64, out_dim=16, num_heads=4, num_layers=3,
                  window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6),
        extras=lambda g: {}),
    "sd3": dict(
        cls="SD3", latent=(1, 16, 16, 16),
        unet=dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, depth=2, patch_size=2,
                  adm_in_channels=32, pos_embed_max_size=16, num_patches=256,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 64, "out_features": 128}}),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}),
}


def build(name: str, seed: int = 0, depth: int | None = None, single: int | None = None):
    """A ModelPatcher around ComfyUI's own model class at tiny size, weights N(0, 0.02)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    spec = CONFIGS[name]
    unet = dict(spec["unet"])
    if depth is not None:
        unet["depth"] = depth
    if single is not None:
        unet["depth_single_blocks"] = single
    cfg = getattr(sm, spec["cls"])(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # Buffers a checkpoint would fill (e.g. SD3's pos_embed) are created empty: give them
        # values too, or they hold whatever was in memory.
        for b in model.diffusion_model.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning(name: str, seed: int = 1, tokens: int = 8):
    g = torch.Generator().manual_seed(seed)
    extras = CONFIGS[name]["extras"]
    positive = [[torch.randn(1, tokens, 64, generator=g), extras(g)]]
    negative = [[torch.randn(1, tokens, 64, generator=g) * 0.5, extras(g)]]
    return positive, negative


def latent(name: str, batch: int = 1, scale: int = 1):
    shape = list(CONFIGS[name]["latent"])
    shape[0] = batch
    shape[-1] *= scale
    shape[-2] *= scale
    return torch.zeros(shape)


def sample(patcher, name: str, steps: int = 12, cfg: float = 2.0, seed: int = 42,
           sampler: str = "euler", scheduler: str = "simple", batch: int = 1, scale: int = 1,
           positive=None, negative=None):
    import comfy.sample
    lat = latent(name, batch, scale)
    lat = comfy.sample.fix_empty_latent_channels(patcher, lat)
    noise = comfy.sample.prepare_noise(lat, seed)
    if positive is None:
        positive, negative = conditioning(name)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, lat,
                               denoise=1.0, disable_pbar=True, seed=seed)
