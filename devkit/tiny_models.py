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


# ---- Every other diffusion-model class ComfyUI builds -----------------------------------------
# Tiny builds of the remaining classes in comfy.supported_models.models, for the test that runs
# every class through the node (tests/comfy/test_comfy_every_model_class.py). Most are a family
# above with the keys that tell the variant apart (input channels, model_type, a conditioning
# embedder); the sizes stay tiny.

def _variant(base: str, cls: str, latent=None, **unet) -> dict:
    """``base``'s tiny build as config class ``cls``, with these config entries changed."""
    spec = dict(CONFIGS[base], cls=cls, unet=dict(CONFIGS[base]["unet"], **unet))
    if latent is not None:
        spec["latent"] = latent
    return spec


def _wan_variant(cls: str, model_type: str, in_dim: int, **extra) -> dict:
    return dict(cls=cls, latent=(1, 16, 3, 8, 8), unet=_tiny_wan(model_type, in_dim=in_dim, **extra), extras=lambda g: {})


def _stable_audio_number_embedders(features_type: str | None = None):
    """Stable Audio's seconds_start/seconds_total embedders come from the checkpoint when the
    model is built: random ones of the shape the class expects."""
    def state_dict(g):
        from comfy.ldm.audio.embedders import NumberConditioner
        out = {}
        for which in ("seconds_start", "seconds_total"):
            kind = {} if features_type is None else {"fourier_features_type": features_type}   # 0.29's Stable Audio 3
            made = NumberConditioner(768, min_val=0, max_val=512, **kind)
            for k, v in made.state_dict().items():
                out[f"conditioner.conditioners.{which}.{k}"] = torch.randn(v.shape, generator=g) * 0.02
        return out
    return state_dict


# SD2.x's and SVD's classes fix 64 channels per head: 64 channels at the first level
_SD2 = dict(use_linear_in_transformer=True, model_channels=64)
_SVD = dict(_SD2, in_channels=8, adm_in_channels=768, num_classes="sequential", use_temporal_resblock=True,
            use_temporal_attention=True, extra_ff_mix_layer=True, merge_strategy="learned_with_images",
            merge_factor=0.0, video_kernel_size=[3, 1, 1], disable_temporal_crossattention=False)
_COSMOS_PREDICT2 = dict(image_model="cosmos_predict2", max_img_h=16, max_img_w=16, max_frames=4, in_channels=16,
                        out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, num_blocks=2, num_heads=4,
                        concat_padding_mask=True, crossattn_emb_channels=64, pos_emb_cls="rope3d",
                        pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
                        use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False,
                        rope_enable_fps_modulation=False)
_COSMOS = dict(image_model="cosmos", max_img_h=16, max_img_w=16, max_frames=4, in_channels=16, out_channels=16,
               patch_spatial=2, patch_temporal=1, model_channels=64, block_config="FA-CA-MLP", concat_padding_mask=True,
               pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop", block_x_format="THWBD",
               affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=16, num_blocks=2, num_heads=4,
               extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="learnable",
               crossattn_emb_channels=64)
_HUNYUAN3D = dict(image_model="hunyuan3d2", in_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
                  num_heads=4, depth=1, depth_single_blocks=1, qkv_bias=True, guidance_embed=True)
# Stable Audio: rotary embedding over at least 32 of each head's channels, so heads of 64;
# its cross-attention takes the text joined with 768-wide seconds embeddings
_STABLE_AUDIO = dict(audio_model="dit1.0", io_channels=64, embed_dim=128, depth=2, num_heads=2, cond_token_dim=768,
                     project_cond_tokens=True, global_cond_dim=1536, input_concat_dim=0)
_PIXELDIT = dict(in_channels=3, num_groups=4, hidden_size=64, pixel_hidden_size=8, pixel_attn_hidden_size=32,
                 pixel_num_groups=4, patch_depth=2, pixel_depth=1, patch_size=4, txt_embed_dim=64, txt_max_length=8)
# PixArt: its position table needs (height + width) / 2 >= 48 latent pixels; alpha's size
# conditioning splits the width in three
_PIXART = dict(input_size=48, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4, caption_channels=64,
               model_max_length=8, pe_interpolation=1.0)

CONFIGS.update({
    # U-Nets
    "sd15_instructpix2pix": _variant("sd15", "SD15_instructpix2pix", in_channels=8),
    "sd20": _variant("sd15", "SD20", **_SD2),
    "sd21_unclip_l": _variant("sd15", "SD21UnclipL", **_SD2, adm_in_channels=1536, num_classes="sequential"),
    "sd21_unclip_h": _variant("sd15", "SD21UnclipH", **_SD2, adm_in_channels=2048, num_classes="sequential"),
    "lotus": _variant("sd15", "LotusD", **_SD2, adm_in_channels=4, num_classes="sequential"),
    "zero123": dict(_variant("sd15", "Stable_Zero123", in_channels=8),       # its projection comes from the checkpoint
                    state_dict=lambda g: {"cc_projection.weight": torch.randn(64, 64, generator=g) * 0.02,
                                          "cc_projection.bias": torch.zeros(64)}),
    # the x4 upscaler's class switches self-attention off per level: four levels
    "sd_x4_upscaler": _variant("sd15", "SD_X4Upscaler", in_channels=7, use_linear_in_transformer=True,
                               channel_mult=[1, 1, 2, 2], num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 1],
                               transformer_depth_output=[1] * 8),
    "sdxl_instructpix2pix": _variant("sdxl", "SDXL_instructpix2pix", in_channels=8),
    "sdxl_refiner": _variant("sdxl", "SDXLRefiner", adm_in_channels=64 + 5 * 256),
    "ssd1b": _variant("sdxl", "SSD1B"),
    "koala_700m": _variant("sdxl", "KOALA_700M"),
    "koala_1b": _variant("sdxl", "KOALA_1B"),
    "segmind_vega": _variant("sdxl", "Segmind_Vega"),
    "svd": _variant("sd15", "SVD_img2vid", **_SVD),
    "sv3d_u": _variant("sd15", "SV3D_u", **dict(_SVD, adm_in_channels=256)),
    "sv3d_p": _variant("sd15", "SV3D_p", **dict(_SVD, adm_in_channels=1280)),
    "stable_cascade_c": dict(cls="Stable_Cascade_C", latent=(1, 16, 8, 8),
        unet=dict(stable_cascade_stage="c", c_cond=64, c_hidden=[64, 64], nhead=[4, 4], blocks=[[1, 1], [1, 1]],
                  c_clip_text=64, c_clip_text_pooled=32, c_r=16),
        extras=lambda g: {"pooled_output": torch.randn(1, 1, 32, generator=g)}),
    "stable_cascade_b": dict(cls="Stable_Cascade_B", latent=(1, 4, 16, 16),
        unet=dict(stable_cascade_stage="b", c_cond=64, c_hidden=[32, 64, 64, 64], nhead=[-1, -1, 4, 4],
                  blocks=[[1, 1, 1, 1], [1, 1, 1, 1]], block_repeat=[[1, 1, 1, 1], [1, 1, 1, 1]], c_clip=32, c_r=16),
        extras=lambda g: {"pooled_output": torch.randn(1, 1, 32, generator=g)}),
    # FLUX and HunyuanVideo relatives
    "flux_schnell": _variant("flux", "FluxSchnell", guidance_embed=False),
    "longcat_image": _variant("flux", "LongCatImage", guidance_embed=False, vec_in_dim=None, txt_ids_dims=[1, 2]),
    "chroma_radiance": _variant("chroma", "ChromaRadiance", latent=(1, 3, 32, 32), image_model="chroma_radiance",
                                in_channels=3, out_channels=3, patch_size=4, nerf_hidden_size=16, nerf_mlp_ratio=2,
                                nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=512, nerf_final_head_type="linear",
                                nerf_embedder_dtype=torch.float32, use_x0=False, use_sequential_txt_ids=False),
    "hunyuan_video_i2v": _variant("hunyuan_video", "HunyuanVideoI2V", in_channels=33),
    "hunyuan_video_skyreels_i2v": _variant("hunyuan_video", "HunyuanVideoSkyreelsI2V", in_channels=32),
    "hunyuan_video15_sr": _variant("hunyuan_video15", "HunyuanVideo15_SR_Distilled", in_channels=98),
    "hunyuan_image21": _variant("hunyuan_video", "HunyuanImage21", latent=(1, 64, 8, 8), in_channels=64,
                                out_channels=64, vec_in_dim=None, guidance_embed=False, patch_size=[1, 1], axes_dim=[8, 8]),
    "hunyuan_image21_refiner": _variant("hunyuan_video", "HunyuanImage21Refiner", latent=(1, 64, 3, 8, 8),
                                        in_channels=128, out_channels=64, vec_in_dim=None, patch_size=[1, 1, 1],
                                        guidance_embed=False),
    "hunyuan3d2": dict(cls="Hunyuan3Dv2", latent=(1, 64, 32), unet=_HUNYUAN3D, extras=lambda g: {}),
    "hunyuan3d2_mini": dict(cls="Hunyuan3Dv2mini", latent=(1, 64, 32), unet=_HUNYUAN3D, extras=lambda g: {}),
    "hunyuan3d2_1": dict(cls="Hunyuan3Dv2_1", latent=(1, 64, 32),
        unet=dict(image_model="hunyuan3d2_1", in_channels=64, context_dim=64, hidden_size=64, mlp_ratio=4.0,
                  num_heads=4, depth=2, qkv_bias=False),
        extras=lambda g: {}),
    # Wan relatives
    "wan21_fun_control": _wan_variant("WAN21_FunControl2V", "i2v", 48),
    "wan22_camera": _wan_variant("WAN22_Camera", "camera_2.2", 36, in_dim_control_adapter=24),
    "wan22_s2v": _wan_variant("WAN22_S2V", "s2v", 16),
    "wan21_humo": _wan_variant("WAN21_HuMo", "humo", 16),
    "wan22_animate": _wan_variant("WAN22_Animate", "animate", 16),
    "wan21_causal_ar": _wan_variant("WAN21_CausalAR_T2V", "t2v", 16, causal_ar=True),      # ComfyUI >= 0.29
    "wan21_flow_rvs": _wan_variant("WAN21_FlowRVS", "flow_rvs", 16),
    "wan21_scail2": _wan_variant("WAN21_SCAIL2", "scail2", 20),
    "wan22_wandancer": _wan_variant("WAN22_WanDancer", "wandancer", 36),
    "cogvideox_i2v": _variant("cogvideox", "CogVideoX_I2V", in_channels=32),
    "cogvideox_inpaint": _variant("cogvideox", "CogVideoX_Inpaint", in_channels=48),
    # Kandinsky 5 video: latent, image latent and mask joined per patch (33 x 4 channels)
    "kandinsky5_video": _variant("kandinsky5", "Kandinsky5", latent=(1, 16, 3, 8, 8), visual_embed_dim=132),
    "zimage_pixel": _variant("zimage", "ZImagePixelSpace", latent=(1, 3, 32, 32), image_model="zimage_pixel",
                             patch_size=4, in_channels=3, decoder_in_channels=48, decoder_hidden_size=32,
                             decoder_num_res_blocks=1, decoder_max_freqs=4),
    # Other DiTs
    "pixart_alpha": dict(cls="PixArtAlpha", latent=(1, 4, 48, 48), min_side=48,
        unet=dict(_PIXART, image_model="pixart_alpha", micro_condition=True), extras=lambda g: {}),
    "pixart_sigma": dict(cls="PixArtSigma", latent=(1, 4, 48, 48), min_side=48,
        unet=dict(_PIXART, image_model="pixart_sigma", micro_condition=False, hidden_size=64), extras=lambda g: {}),
    "hunyuan_dit": dict(cls="HunyuanDiT", latent=(1, 4, 16, 16),
        unet=dict(image_model="hydit", input_size=(16, 16), patch_size=2, in_channels=4, hidden_size=64, depth=2,
                  num_heads=4, text_states_dim=64, text_states_dim_t5=64, text_len=8, text_len_t5=8, learn_sigma=True),
        extras=lambda g: {"conditioning_mt5xl": torch.randn(1, 8, 64, generator=g), "attention_mask": torch.ones(1, 8),
                          "attention_mask_mt5xl": torch.ones(1, 8)}),
    # HiDream: one projection per Llama layer it reads (here 2: one per block) plus one for T5
    "hidream": dict(cls="HiDream", latent=(1, 16, 16, 16),
        unet=dict(image_model="hidream", attention_head_dim=16, axes_dims_rope=[8, 4, 4], caption_channels=[64, 64],
                  max_resolution=[16, 16], in_channels=16, out_channels=16, llama_layers=[0, 1], num_attention_heads=4,
                  num_routed_experts=4, num_activated_experts=2, num_layers=1, num_single_layers=1, patch_size=2,
                  text_emb_dim=32),
        extras=lambda g: {"pooled_output": torch.randn(1, 32, generator=g),
                          "conditioning_llama3": torch.randn(1, 2, 8, 64, generator=g)}),
    "cosmos_t2v": dict(cls="CosmosT2V", latent=(1, 16, 1, 8, 8), unet=_COSMOS, extras=lambda g: {}),
    "cosmos_i2v": dict(cls="CosmosI2V", latent=(1, 16, 1, 8, 8), unet=dict(_COSMOS, in_channels=17),
                       extras=lambda g: {}),
    "cosmos_predict2_t2i": dict(cls="CosmosT2IPredict2", latent=(1, 16, 1, 8, 8), unet=_COSMOS_PREDICT2,
                                extras=lambda g: {}),
    "cosmos_predict2_i2v": dict(cls="CosmosI2VPredict2", latent=(1, 16, 1, 8, 8),
                                unet=dict(_COSMOS_PREDICT2, in_channels=17), extras=lambda g: {}),
    "anima": dict(cls="Anima", latent=(1, 16, 1, 8, 8), unet=dict(_COSMOS_PREDICT2, image_model="anima"),
                  extras=lambda g: {}),
    "omnigen2": dict(cls="Omnigen2", latent=(1, 16, 16, 16),
        unet=dict(image_model="omnigen2", axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), ffn_dim_multiplier=None,
                  hidden_size=64, in_channels=16, multiple_of=16, norm_eps=1e-5, num_attention_heads=4, num_kv_heads=4,
                  num_layers=2, num_refiner_layers=1, out_channels=None, patch_size=2, text_feat_dim=64,
                  timestep_scale=1000.0),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    "ideogram4": dict(cls="Ideogram4", latent=(1, 128, 8, 8), sizes_over_class_defaults=True,
        unet=dict(image_model="ideogram4", in_channels=128, num_layers=2, num_attention_heads=4, attention_head_dim=16,
                  intermediate_size=128, adaln_dim=32, llm_features_dim=64, rope_theta=10000, mrope_section=[2, 3, 3],
                  norm_eps=1e-5),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # LTX-2 audio-video: a nested latent (video, audio); the text context is the video and audio
    # connectors' inputs side by side (caption_channels each)
    "ltxav": dict(cls="LTXAV", latent=(1, 128, 2, 4, 4), latents=[(1, 128, 2, 4, 4), (1, 8, 4, 16)], context_width=128,
        unet=dict(image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=64,
                  audio_cross_attention_dim=32, attention_head_dim=16, audio_attention_head_dim=8, num_attention_heads=4,
                  audio_num_attention_heads=4, caption_channels=64, num_layers=2,
                  # its text connectors are full size (700 M weights) unless their sizes are given
                  connector_attention_head_dim=16, connector_num_attention_heads=4, connector_num_layers=1),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    # TripoSplat (3D): a nested latent too, the splat tokens and a camera token
    "triposplat": dict(cls="TripoSplat", latent=(1, 32, 16), latents=[(1, 32, 16), (1, 1, 5)],
        unet=dict(image_model="triposplat", q_token_length=32, in_channels=16, model_channels=64, cond_channels=64,
                  out_channels=16, num_blocks=2, num_refiner_blocks=1, num_head_channels=16, cam_channels=5,
                  cond2_channels=128),
        extras=lambda g: {}),
    # Pixel space: PixelDiT and its decoder PiD (conditioned on a low-resolution latent, 1 x 1 here:
    # 32 pixels / 4 (super-resolution) / 8 (the latent's downscale))
    "pixeldit": dict(cls="PixelDiTT2I", latent=(1, 3, 32, 32), unet=dict(_PIXELDIT, image_model="pixeldit_t2i"),
                     extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long)}),
    "pid": dict(cls="PiD", latent=(1, 3, 32, 32), min_side=32,
        unet=dict(_PIXELDIT, image_model="pid", lq_latent_channels=16, lq_hidden_dim=32, lq_num_res_blocks=1, lq_interval=1,
                  sr_scale=4, latent_spatial_down_factor=8, rope_ref_h=128, rope_ref_w=128),
        extras=lambda g: {"attention_mask": torch.ones(1, 8, dtype=torch.long),
                          "lq_latent": torch.randn(1, 16, 1, 1, generator=g), "degrade_sigma": torch.tensor([0.1])}),
    # SeedVR2 (video restoration): the degraded video's latent and mask come in as "condition"
    "seedvr2": dict(cls="SeedVR2", latent=(1, 16, 1, 8, 8),
        unet=dict(image_model="seedvr2", norm_eps=1e-5, num_layers=2, mlp_type="swiglu", vid_in_channels=33,
                  vid_out_channels=16, vid_dim=64, txt_in_dim=64, heads=4, head_dim=16, mm_layers=1, rope_dim=8,
                  rope_type="mmrope3d"),
        extras=lambda g: {"condition": torch.zeros(1, 17, 1, 8, 8)}),
    # HiDream-O1: a Qwen3-VL language model over text tokens and 32-pixel patches (its vocabulary
    # keeps the full size: the image and timestep token ids are fixed)
    "hidream_o1": dict(cls="HiDreamO1", latent=(1, 3, 64, 64), min_side=64,
        unet=dict(image_model="hidream_o1",
                  text_config_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_dims=[4, 2, 2]),
                  vision_config_overrides=dict(hidden_size=32, num_heads=2, intermediate_size=64, depth=1,
                                               num_position_embeddings=64, deepstack_visual_indexes=())),
        extras=lambda g: {"text_input_ids": torch.randint(0, 1000, (1, 8), generator=g)}),
    # Audio
    # ACE-Step: its lyric encoder is 1024 wide whatever the model's width; latent 8 x 16 x length
    "ace_step": dict(cls="ACEStep", latent=(1, 8, 16, 16),
        unet=dict(audio_model="ace", in_channels=8, num_layers=2, inner_dim=64, attention_head_dim=16, num_attention_heads=4,
                  mlp_ratio=2.5, out_channels=8, max_position=1024, rope_theta=1e6, speaker_embedding_dim=512,
                  text_embedding_dim=64, ssl_encoder_depths=[1, 1], ssl_latent_dims=[32, 32], ssl_names=["mert", "m-hubert"],
                  lyric_encoder_vocab_size=64, lyric_hidden_size=1024, patch_size=[16, 1], max_height=16, max_width=64),
        extras=lambda g: {"conditioning_lyrics": torch.randint(0, 64, (1, 8), generator=g)}),
    # ACE-Step 1.5: 64 latent channels, joined with a reference ("silence") latent and its mask
    "ace_step15": dict(cls="ACEStep15", latent=(1, 64, 32),
        unet=dict(audio_model="ace1.5", in_channels=192, hidden_size=64, text_hidden_dim=64, num_dit_layers=2,
                  num_lyric_layers=1, num_timbre_layers=1, num_tokenizer_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, sliding_window=16, fsq_dim=64, encoder_hidden_size=64,
                  encoder_intermediate_size=128, encoder_num_heads=4),
        extras=lambda g: {"conditioning_lyrics": torch.randn(1, 8, 64, generator=g)}),
    "stable_audio": dict(cls="StableAudio", latent=(1, 64, 32), unet=_STABLE_AUDIO, extras=lambda g: {},
                         context_width=768, state_dict=_stable_audio_number_embedders()),
    "stable_audio3": dict(cls="StableAudio3", latent=(1, 256, 32),
        unet=dict(_STABLE_AUDIO, io_channels=256, global_cond_dim=768, global_cond_shared_embed=True,
                  global_cond_type="adaLN", timestep_features_type="learned"),
        extras=lambda g: {}, context_width=768, state_dict=_stable_audio_number_embedders("learned")),
})
# Hunyuan-DiT 1.0: Hunyuan-DiT with image-size and style conditioning
CONFIGS["hunyuan_dit1"] = _variant("hunyuan_dit", "HunyuanDiT1", image_model="hydit1", size_cond=True, use_style_cond=True)


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
    "chroma_radiance": ("comfy.ldm.chroma_radiance.model", "ChromaRadianceParams"),
}
_NEWER_FIELDS = {"use_x0", "use_sequential_txt_ids"}     # left out where the running version lacks them
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
    declared = {f.name for f in dataclasses.fields(params)}
    for name in _NEWER_FIELDS - declared:
        out.pop(name, None)
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
    if spec.get("sizes_over_class_defaults"):
        # The class's unet_extra_config fixes full-size dimensions (Ideogram 4): the tiny ones win
        cfg.unet_config.update(unet)
    if weight_dtype is None:
        cfg.set_inference_dtype(torch.float32, None)
    else:
        cfg.set_inference_dtype(weight_dtype, torch.float32)   # stored low, computed in float32
    g = torch.Generator().manual_seed(seed)
    # A few classes take tensors from the checkpoint when they are built (Zero123's projection)
    state_dict = spec["state_dict"](g) if "state_dict" in spec else {}
    with torch.no_grad():            # as ComfyUI's executor runs its loaders (0.3.64's Zero123 copies in place)
        model = cfg.get_model(state_dict, device=torch.device("cpu"))
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
    width = CONFIGS[name].get("context_width", 64)
    positive = [[torch.randn(1, tokens, width, generator=g), extras(g)]]
    negative = [[torch.randn(1, tokens, width, generator=g) * 0.5, extras(g)]]
    return positive, negative


def latent(name: str, batch: int = 1, scale: int = 1, max_side: int | None = None):
    """An empty latent of the model's shape; ``max_side`` caps its height and width (not below
    the smallest the model takes, its config's ``min_side``)."""
    if "latents" in CONFIGS[name]:      # a model of several latents (LTX-2's video + audio): nested
        import comfy.nested_tensor
        return comfy.nested_tensor.NestedTensor([torch.zeros((batch, *shape[1:])) for shape in CONFIGS[name]["latents"]])
    shape = list(CONFIGS[name]["latent"])
    shape[0] = batch
    shape[-1] *= scale
    shape[-2] *= scale
    if max_side is not None and len(shape) >= 4:
        cap = max(max_side, CONFIGS[name].get("min_side", 0))
        shape[-1], shape[-2] = min(shape[-1], cap), min(shape[-2], cap)
    return torch.zeros(shape)


def sample(patcher, name: str, steps: int = 12, cfg: float = 2.0, seed: int = 42,
           sampler: str = "euler", scheduler: str = "simple", batch: int = 1, scale: int = 1,
           positive=None, negative=None, max_side: int | None = None):
    import comfy.sample
    lat = latent(name, batch, scale, max_side)
    lat = comfy.sample.fix_empty_latent_channels(patcher, lat)
    noise = comfy.sample.prepare_noise(lat, seed)
    if positive is None:
        positive, negative = conditioning(name)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, lat,
                               denoise=1.0, disable_pbar=True, seed=seed)
