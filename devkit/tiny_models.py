"""Tiny ComfyUI models built through ComfyUI's own config classes (random weights).

They exercise the real model code, hooks and sampler on the CPU in milliseconds; they
say nothing about quality (random weights have no learned dynamics)."""

from __future__ import annotations

import torch

def _tiny_wan(model_type: str, in_dim: int, out_dim: int = 16, num_layers: int = 3, **extra) -> dict:
    """The config of a tiny Wan 2.1-architecture model (every Wan variant below: width 64, 4 heads)."""
    return dict(image_model="wan2.1", model_type=model_type, patch_size=(1, 2, 2), text_len=16, in_dim=in_dim,
                dim=64, ffn_dim=128, freq_dim=256, text_dim=64, out_dim=out_dim, num_heads=4,
                num_layers=num_layers, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                **extra)


CONFIGS = {
    "flux": dict(
        cls="Flux", latent=(1, 16, 16, 16),
        unet=dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                  hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2,
                  axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}),
    # FLUX.1 Fill: 16 latent + 16 masked-image latent + 64 mask channels (8 x 8 pixels per latent
    # pixel) in, 16 out; the concatenated channels come from the conditioning (concat_latent_image,
    # concat_mask), as ComfyUI's InpaintModelConditioning gives them
    "flux_fill": dict(
        cls="FluxInpaint", latent=(1, 16, 16, 16),
        unet=dict(image_model="flux", in_channels=96, out_channels=16, vec_in_dim=32, context_in_dim=64,
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
    # ComfyUI >= 0.8.0: FLUX.2 (global modulation passed to the blocks in ``vec``, 128 latent
    # channels, patch 1, 4 rope axes, text padded to 512 tokens).
    "flux2": dict(
        cls="Flux2", latent=(1, 128, 8, 8),
        unet=dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64,
                  hidden_size=64, mlp_ratio=3.0, num_heads=4, depth=2, depth_single_blocks=2,
                  axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
                  txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 4.0}),
    "wan21": dict(
        cls="WAN21_T2V", latent=(1, 16, 3, 8, 8),
        unet=_tiny_wan("t2v", in_dim=16),
        extras=lambda g: {}),
    # image to video by channel concatenation: 16 latent + 4 mask + 16 image channels in, 16 out
    "wan21_i2v": dict(
        cls="WAN21_I2V", latent=(1, 16, 3, 8, 8),
        unet=_tiny_wan("i2v", in_dim=36),
        extras=lambda g: {}),
    # VACE: 2 VACE blocks fed by the control video (zeros and a full mask when the graph gives none)
    "wan21_vace": dict(
        cls="WAN21_Vace", latent=(1, 16, 3, 8, 8),
        unet=_tiny_wan("vace", in_dim=16, num_layers=4, vace_layers=2, vace_in_dim=96),
        extras=lambda g: {}),
    # Camera control (Wan 2.1 Fun camera): the camera adapter adds to the embedded input, before
    # the blocks; 16 latent + 16 reference-image channels in
    "wan21_camera": dict(
        cls="WAN21_Camera", latent=(1, 16, 3, 8, 8),
        unet=_tiny_wan("camera", in_dim=32, in_dim_control_adapter=24),
        extras=lambda g: {}),
    "wan22": dict(
        cls="WAN22_T2V", latent=(1, 48, 3, 8, 8),
        unet=_tiny_wan("t2v", in_dim=48, out_dim=48),
        extras=lambda g: {}),
    "qwen_image": dict(
        cls="QwenImage", latent=(1, 16, 1, 16, 16),
        unet=dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
        extras=lambda g: {}),
    "ltxv": dict(
        cls="LTXV", latent=(1, 128, 2, 4, 4),
        unet=dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=16,
                  num_attention_heads=4, caption_channels=64, num_layers=3),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # AuraFlow: MMDiT double layers (img + txt) then single layers over the joined sequence
    "auraflow": dict(
        cls="AuraFlow", latent=(1, 4, 16, 16),
        unet=dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=4, n_double_layers=2,
                  n_heads=4, global_conddim=64, cond_seq_dim=64, max_seq=64),
        extras=lambda g: {}),
    # Mochi: joint blocks with separate image and text widths; the last block leaves the text as it
    # is. Its block asserts an image MLP width of 1536 x 8, whatever the hidden size: ratio 192.
    "mochi": dict(
        cls="GenmoMochi", latent=(1, 12, 3, 8, 8),
        unet=dict(image_model="mochi_preview", depth=3, patch_size=2, num_heads=4, hidden_size_x=64,
                  hidden_size_y=32, mlp_ratio_x=192.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12,
                  qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True,
                  posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False,
                  timestep_scale=1000.0, use_t5=True, t5_feat_dim=64, t5_token_length=8, rope_theta=10000.0),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    "lumina2": dict(
        cls="Lumina2", latent=(1, 16, 16, 16),
        unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=3, n_refiner_layers=1,
                  n_heads=4, n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True,
                  cap_feat_dim=64, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64]),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # ComfyUI >= 0.8.0
    "zimage": dict(
        cls="ZImage", latent=(1, 16, 16, 16),
        # z_image_modulation's adaLN input is 256 wide: the smallest width that fits is 256
        unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=3, n_refiner_layers=1,
                  n_heads=16, n_kv_heads=16, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                  cap_feat_dim=64, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64], rope_theta=256.0,
                  z_image_modulation=True, time_scale=1000.0),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    "hunyuan_video15": dict(
        cls="HunyuanVideo15", latent=(1, 32, 3, 8, 8),
        unet=dict(image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None,
                  context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=2,
                  depth_single_blocks=2, axes_dim=[4, 6, 6], theta=256, patch_size=[1, 1, 1],
                  qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
                  use_cond_type_embedding=True, vision_in_dim=None, meanflow_sum=False),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}),
    "kandinsky5": dict(
        cls="Kandinsky5Image", latent=(1, 16, 16, 16),
        unet=dict(image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=64, in_text_dim2=32,
                  time_dim=32, model_dim=64, ff_dim=128, visual_embed_dim=64, patch_size=(1, 2, 2),
                  num_text_blocks=1, num_visual_blocks=3, axes_dims=(4, 6, 6)),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}),
    "sd3": dict(
        cls="SD3", latent=(1, 16, 16, 16),
        unet=dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, depth=2, patch_size=2,
                  adm_in_channels=32, pos_embed_max_size=16, num_patches=256,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 64, "out_features": 128}}),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g)}),
    # ---- ComfyUI >= 0.29 -------------------------------------------------------------------
    # Block level: Wan SCAIL (the pose tokens, when given, ride in img; 16 latent + 4 mask channels in)
    "wan21_scail": dict(
        cls="WAN21_SCAIL", latent=(1, 16, 3, 8, 8),
        unet=_tiny_wan("scail", in_dim=20),
        extras=lambda g: {}),
    # JoyImage: its config class fixes rope_dim_list [16, 56, 56], so one head of 128
    "joyimage": dict(
        cls="JoyImage", latent=(1, 16, 1, 8, 8),
        unet=dict(image_model="joyimage", in_channels=16, hidden_size=128, num_attention_heads=1, text_dim=64,
                  num_layers=3),
        extras=lambda g: {}),
    "lens": dict(
        cls="Lens", latent=(1, 128, 8, 8),
        unet=dict(image_model="lens", in_channels=128, out_channels=32, num_layers=3, attention_head_dim=16,
                  num_attention_heads=4, enc_hidden_dim=64, axes_dims_rope=(4, 6, 6),
                  multi_layer_encoder_feature=False),
        extras=lambda g: {}),
    "mage_flow": dict(
        cls="MageFlow", latent=(1, 128, 8, 8),
        unet=dict(image_model="mage_flow", in_channels=128, out_channels=128, num_layers=3, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
        extras=lambda g: {}),
    # Output level (their forwards call no block patches)
    "ernie": dict(
        cls="ErnieImage", latent=(1, 128, 8, 8),
        unet=dict(image_model="ernie", hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=128,
                  in_channels=128, out_channels=128, text_in_dim=64, rope_axes_dim=(4, 6, 6)),
        extras=lambda g: {}),
    "krea2": dict(
        cls="Krea2", latent=(1, 16, 1, 8, 8),
        unet=dict(image_model="krea2", features=64, tdim=256, txtdim=64, heads=4, kvheads=4, layers=2, patch=2,
                  channels=16, txtlayers=1, txtheads=4, txtkvheads=4),
        extras=lambda g: {}),
    # CogVideoX: its 3D sin-cos position table needs a width of 3 x 64
    "cogvideox": dict(
        cls="CogVideoX_T2V", latent=(1, 16, 2, 8, 8),
        unet=dict(image_model="cogvideox", num_attention_heads=3, attention_head_dim=64, in_channels=16,
                  out_channels=16, time_embed_dim=64, text_embed_dim=64, num_layers=2),
        extras=lambda g: {}),
    "boogu": dict(
        cls="Boogu", latent=(1, 16, 8, 8),
        unet=dict(image_model="boogu", hidden_size=64, num_layers=2, num_double_stream_layers=1,
                  num_refiner_layers=1, num_attention_heads=4, num_kv_heads=4, multiple_of=16,
                  axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), instruction_feat_dim=64),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # U-Nets (DaTo token pruning): ComfyUI's UNetModel with two levels, a transformer block
    # at each, SD1.5's and SDXL's config classes (SDXL's adm = 64 pooled + 6 x 256 sizes; its
    # class fixes 64 channels per head, so 64 channels at the first level).
    "sd15": dict(
        cls="SD15", latent=(1, 4, 32, 32),
        unet=dict(context_dim=64, model_channels=32, use_linear_in_transformer=False, adm_in_channels=None,
                  use_temporal_attention=False, use_checkpoint=False, image_size=32, out_channels=4,
                  use_spatial_transformer=True, legacy=False, in_channels=4, num_res_blocks=[1, 1],
                  channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                  transformer_depth_middle=1, num_head_channels=16, use_temporal_resblock=False),
        extras=lambda g: {}),
    "sdxl": dict(
        cls="SDXL", latent=(1, 4, 32, 32),
        unet=dict(context_dim=64, model_channels=64, use_linear_in_transformer=True, adm_in_channels=1600,
                  num_classes="sequential",
                  use_temporal_attention=False, use_checkpoint=False, image_size=32, out_channels=4,
                  use_spatial_transformer=True, legacy=False, in_channels=4, num_res_blocks=[1, 1],
                  channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                  transformer_depth_middle=1, num_head_channels=16, use_temporal_resblock=False),
        extras=lambda g: {"pooled_output": torch.randn(1, 64, generator=g)}),
}


# Fields that newer ComfyUI versions made required in a family's params dataclass, with
# the value that keeps the older behaviour (ComfyUI 0.8.0's model_detection sets these for
# FLUX.1, Chroma and HunyuanVideo checkpoints). Filled only where the running version
# declares the field, so the same configs build on 0.3.64 and on 0.8.0.
_PARAMS_CLASSES = {
    "flux": ("comfy.ldm.flux.model", "FluxParams"),
    "flux2": ("comfy.ldm.flux.model", "FluxParams"),
    "flux_fill": ("comfy.ldm.flux.model", "FluxParams"),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams"),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams"),
}
_NEW_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "use_cond_type_embedding": False,
               "vision_in_dim": None, "meanflow_sum": False}


def complete_unet_config(unet: dict) -> dict:
    """``unet`` with the fields the running ComfyUI requires and an older one did not know."""
    import dataclasses
    import importlib
    where = _PARAMS_CLASSES.get(unet.get("image_model"))
    if where is None:
        return dict(unet)
    params = getattr(importlib.import_module(where[0]), where[1], None)
    out = dict(unet)
    if params is None or not dataclasses.is_dataclass(params):
        return out
    for f in dataclasses.fields(params):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in out and f.name in _NEW_FIELDS:
            out[f.name] = _NEW_FIELDS[f.name]
    return out


def available(name: str) -> bool:
    """Whether the running ComfyUI has this model's config class (FLUX.2 came in 0.8.0)."""
    import comfy.supported_models as sm
    return hasattr(sm, CONFIGS[name]["cls"])


def build(name: str, seed: int = 0, depth: int | None = None, single: int | None = None,
          weight_dtype: torch.dtype | None = None, **unet_overrides):
    """A ModelPatcher around ComfyUI's own model class at tiny size, weights N(0, 0.02).
    ``unet_overrides`` change entries of the family's config (e.g. ``guidance_embed=False``).
    ``weight_dtype`` (e.g. torch.float8_e4m3fn): weights stored in that type and cast to
    float32 on the fly, as ComfyUI's UNETLoader does with its weight_dtype input."""
    import comfy.supported_models as sm

    spec = CONFIGS[name]
    unet = dict(spec["unet"], **unet_overrides)
    if depth is not None:
        unet["depth"] = depth
    if single is not None:
        unet["depth_single_blocks"] = single
    cfg = getattr(sm, spec["cls"])(complete_unet_config(unet))
    if weight_dtype is None:
        cfg.set_inference_dtype(torch.float32, None)
    else:
        cfg.set_inference_dtype(weight_dtype, torch.float32)   # stored low, computed in float32
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
    return patcher(model)


def patcher(model):
    """A ModelPatcher around a BaseModel built on the CPU, in eval mode."""
    import comfy.model_management as mm
    import comfy.model_patcher
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_into(cfg, state_dict=None):
    """A ModelPatcher around ``cfg``'s model (a ComfyUI model config) with ``state_dict`` loaded
    through ComfyUI's own conversion of a checkpoint's names to its class's (0.29 renamed the
    RMSNorm parameter of its Flux class from .scale to .weight and converts FLUX checkpoints there)."""
    model = cfg.get_model({}, device=torch.device("cpu"))
    if state_dict is not None:
        model.diffusion_model.load_state_dict(cfg.process_unet_state_dict(dict(state_dict)), strict=True)
    return patcher(model)


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
