"""The reference model: ComfyUI's own FLUX architecture at small size, trained on real
images (scikit-image's bundled photographs), loaded through ComfyUI's FLUX model config.

Image <-> latent: a grayscale 128x128 image becomes a 16x32x32 latent by 4x4 pixel
unshuffle (lossless), scaled to unit-ish variance. With FLUX's 2x2 patches that is 256
image tokens, each an 8x8 pixel patch. Conditioning is FLUX's: ``context`` tokens and a
pooled vector, here fixed random embeddings of a class label (one class per source
photograph, plus a null class for the negative prompt)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent / "reference"
WEIGHTS = HERE / "flux_tiny.safetensors"
CONFIG_FILE = HERE / "config.json"

UNET_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=128, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4,
                   axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)
# The deep reference model: FLUX.1's depth ratio (19 double + 38 single blocks there, 5 + 14
# here), narrow enough to train on 2 CPU cores; the same data, conditioning and recipe. A
# verification probe (one block) is 1/19 of a step, as 1/57 is on FLUX.1: the regime the
# defaults must be tuned for.
# Two heads of 32, so that rope has the same positional resolution as the 6-block model (a
# first run with 4 heads of 16, axes [4, 6, 6], reached loss 0.24 in 1200 steps but its samples
# had no spatial structure: 8x8-pixel patches with the right statistics, in no arrangement).
DEEP_UNET_CONFIG = dict(UNET_CONFIG, hidden_size=64, num_heads=2, depth=5, depth_single_blocks=14,
                        axes_dim=[8, 12, 12])
# The held-out model (issue 35): another family, other data, another recipe, never used to tune
# anything. ComfyUI's own Wan 2.1 architecture (self-attention, cross-attention to the text, one
# time modulation shared by the blocks, no pooled vector), 6 blocks of width 64 in 2 heads of 32
# (rope keeps 5 frequencies per spatial axis), batch 24, trained on eight other photographs as
# one-frame videos. (A first run trained at noise levels shifted towards noise, shift 3, saw too
# few low noise levels: its samples kept noise inside every 8x8 patch. ComfyUI samples Wan 2.1
# with shift 8 whatever the training.)
WAN_UNET_CONFIG = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=4, in_dim=16,
                       dim=64, ffn_dim=256, freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=6,
                       window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
CLASSES = ["brick", "grass", "gravel", "coins", "astronaut", "camera", "chelsea", "coffee"]
HELD_OUT_CLASSES = ["moon", "clock", "rocket", "hubble_deep_field", "cell", "horse", "retina",
                    "immunohistochemistry"]
MODELS = {
    "reference": dict(folder=HERE, unet=UNET_CONFIG, family="flux", classes=CLASSES),
    "reference_deep": dict(folder=HERE.parent / "reference_deep", unet=DEEP_UNET_CONFIG, family="flux",
                           classes=CLASSES),
    "reference_wan": dict(folder=HERE.parent / "reference_wan", unet=WAN_UNET_CONFIG, family="wan",
                          classes=HELD_OUT_CLASSES),
}


def model_files(name: str = "reference") -> tuple[Path, Path, Path]:
    """(weights, config.json, samples.png) of a reference model."""
    folder = MODELS[name]["folder"]
    return folder / WEIGHTS.name, folder / CONFIG_FILE.name, folder / "samples.png"


def is_wan(name: str) -> bool:
    return MODELS[name]["family"] == "wan"


def latent_shape(name: str = "reference") -> tuple:
    """The sampler's latent of one image: FLUX [1, 16, 32, 32], Wan one frame [1, 16, 1, 32, 32]."""
    return (1, 16, 1, 32, 32) if is_wan(name) else (1, 16, 32, 32)


NULL_CLASS = len(CLASSES)
TXT_TOKENS = 4
IMAGE_SIZE = 128
UNSHUFFLE = 4
DATA_SCALE = 2.0   # pixels in [0, 1] -> (p - mean) * scale
COND_SEED = 20261128


def class_embeddings():
    """Fixed (seeded) context tokens and pooled vectors for every class and the null class."""
    g = torch.Generator().manual_seed(COND_SEED)
    n = len(CLASSES) + 1
    context = torch.randn(n, TXT_TOKENS, UNET_CONFIG["context_in_dim"], generator=g)
    pooled = torch.randn(n, UNET_CONFIG["vec_in_dim"], generator=g)
    context[NULL_CLASS] = 0.0
    pooled[NULL_CLASS] = 0.0
    return context, pooled


def conditioning(label: int):
    """ComfyUI CONDITIONING for one class label (NULL_CLASS = negative/unconditional)."""
    context, pooled = class_embeddings()
    return [[context[label:label + 1].clone(), {"pooled_output": pooled[label:label + 1].clone()}]]


# ---- data ---------------------------------------------------------------------------
def load_photos(model: str = "reference") -> list[torch.Tensor]:
    """The source photographs of a model's classes (grayscale float in [0, 1]), from
    scikit-image's package data."""
    import skimage.data
    from skimage.color import rgb2gray
    out = []
    for name in MODELS[model]["classes"]:
        img = getattr(skimage.data, name)()
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        img = torch.as_tensor(rgb2gray(img) if img.ndim == 3 else img / 255.0 if img.max() > 1 else img,
                              dtype=torch.float32)
        if img.max() > 1.0:
            img = img / 255.0
        # halve the resolution so a 128x128 crop holds a good part of the scene
        img = F.avg_pool2d(img[None, None], 2)[0, 0]
        out.append(img)
    return out


def pixel_stats(photos) -> tuple[float, float]:
    allpix = torch.cat([p.flatten() for p in photos])
    return float(allpix.mean()), float(allpix.std())


def to_latent(pixels: torch.Tensor, mean: float) -> torch.Tensor:
    """[B, 1, 128, 128] in [0, 1] -> model-space latent [B, 16, 32, 32]."""
    return F.pixel_unshuffle((pixels - mean) * DATA_SCALE, UNSHUFFLE)


def from_latent(latent: torch.Tensor, mean: float) -> torch.Tensor:
    return (F.pixel_shuffle(latent, UNSHUFFLE) / DATA_SCALE + mean).clamp(0, 1)


def random_crops(photos, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = []
    for lab in labels.tolist():
        img = photos[lab]
        h, w = img.shape
        y = int(torch.randint(0, h - IMAGE_SIZE + 1, (1,), generator=g))
        x = int(torch.randint(0, w - IMAGE_SIZE + 1, (1,), generator=g))
        crop = img[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE]
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)[:, None]


# ---- ComfyUI side -------------------------------------------------------------------
def read_config(name: str = "reference") -> dict:
    return json.loads(model_files(name)[1].read_text())


def build_comfy_model(state_dict=None, name: str = "reference"):
    """A ModelPatcher around the model class ComfyUI's own config builds: comfy.supported_models.Flux
    (comfy.model_base.Flux), or WAN21_T2V (comfy.model_base.WAN21) for the Wan reference."""
    import comfy.supported_models as sm
    from .tiny_models import complete_unet_config, load_into
    cfg = (sm.WAN21_T2V if is_wan(name) else sm.Flux)(complete_unet_config(MODELS[name]["unet"]))
    cfg.set_inference_dtype(torch.float32, None)
    return load_into(cfg, state_dict)


def load_reference(name: str = "reference"):
    """A trained reference model through ComfyUI's FLUX config class."""
    from safetensors.torch import load_file
    return build_comfy_model(load_file(str(model_files(name)[0])), name)


def decode(samples: torch.Tensor, name: str = "reference") -> torch.Tensor:
    """ComfyUI's sampler output (the model's latent space) -> grayscale images in [0, 1]."""
    import comfy.latent_formats
    if is_wan(name):
        return from_latent(comfy.latent_formats.Wan21().process_in(samples)[:, :, 0], read_config(name)["pixel_mean"])
    return from_latent(comfy.latent_formats.Flux().process_in(samples), read_config(name)["pixel_mean"])


def training_forward(name: str, patcher, img_latent, t, context, pooled):
    """The model's prediction for a batch of [B, 16, 32, 32] latents at times t in [0, 1], with
    autograd: FLUX through ``train_forward``; Wan through ComfyUI's own forward (its blocks add
    out of place), as one-frame videos at the timestep ComfyUI's sampling gives it (sigma x 1000)."""
    dm = patcher.model.diffusion_model
    if is_wan(name):
        timestep = patcher.model.model_sampling.timestep(t)
        return dm(img_latent[:, :, None], timestep, context)[:, :, 0]
    return train_forward(dm, img_latent, t, context, pooled)


# ---- a differentiable forward with ComfyUI's parameter names ---------------------------
def train_forward(dm, img_latent, t, context, pooled):
    """The FLUX forward of ``comfy.ldm.flux.model.Flux`` written out of place (ComfyUI's blocks
    add residuals in place, which autograd cannot differentiate through). Same parameters,
    same maths; tests check it against ComfyUI's own forward."""
    from einops import rearrange
    from comfy.ldm.flux.layers import timestep_embedding

    b, c, h, w = img_latent.shape
    img = rearrange(img_latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    hl, wl = h // 2, w // 2
    img_ids = torch.zeros(hl, wl, 3)
    img_ids[..., 1] = torch.arange(hl, dtype=torch.float32)[:, None]
    img_ids[..., 2] = torch.arange(wl, dtype=torch.float32)[None, :]
    img_ids = img_ids.reshape(1, hl * wl, 3).expand(b, -1, -1)
    txt_ids = torch.zeros(b, context.shape[1], 3)
    pe = dm.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

    img = dm.img_in(img)
    vec = dm.time_in(timestep_embedding(t, 256).to(img.dtype)) + dm.vector_in(pooled)
    txt = dm.txt_in(context)

    def attn(q, k, v):
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        return rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")

    def heads(qkv, n):
        return qkv.view(qkv.shape[0], qkv.shape[1], 3, n, -1).permute(2, 0, 3, 1, 4)

    for blk in dm.double_blocks:
        im1, im2 = blk.img_mod(vec)
        tm1, tm2 = blk.txt_mod(vec)
        iq, ik, iv = heads(blk.img_attn.qkv(blk.img_norm1(img) * (1 + im1.scale) + im1.shift), blk.num_heads)
        iq, ik = blk.img_attn.norm(iq, ik, iv)
        tq, tk, tv = heads(blk.txt_attn.qkv(blk.txt_norm1(txt) * (1 + tm1.scale) + tm1.shift), blk.num_heads)
        tq, tk = blk.txt_attn.norm(tq, tk, tv)
        a = attn(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2))
        ta, ia = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        img = img + im1.gate * blk.img_attn.proj(ia)
        img = img + im2.gate * blk.img_mlp(blk.img_norm2(img) * (1 + im2.scale) + im2.shift)
        txt = txt + tm1.gate * blk.txt_attn.proj(ta)
        txt = txt + tm2.gate * blk.txt_mlp(blk.txt_norm2(txt) * (1 + tm2.scale) + tm2.shift)

    x = torch.cat((txt, img), 1)
    for blk in dm.single_blocks:
        mod, _ = blk.modulation(vec)
        qkv, mlp = torch.split(blk.linear1(blk.pre_norm(x) * (1 + mod.scale) + mod.shift),
                               [3 * blk.hidden_size, blk.mlp_hidden_dim], dim=-1)
        q, k, v = heads(qkv, blk.num_heads)
        q, k = blk.norm(q, k, v)
        x = x + mod.gate * blk.linear2(torch.cat((attn(q, k, v), blk.mlp_act(mlp)), 2))
    img = dm.final_layer(x[:, txt.shape[1]:], vec)
    return rearrange(img, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=hl, w=wl, ph=2, pw=2)


def apply_rope(x, pe):
    """FLUX's rotary embedding (comfy.ldm.flux.math.apply_rope1), written out for autograd:
    ComfyUI 0.8.0 runs its own through a comfy_kitchen kernel that has no backward."""
    x_ = x.to(dtype=pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def logit_normal_t(n: int, g: torch.Generator) -> torch.Tensor:
    """Training times t ~ sigmoid(N(0, 1)) (rectified flow as in SD3/FLUX)."""
    return torch.sigmoid(torch.randn(n, generator=g))


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def sample(patcher, labels, seeds, steps: int = 28, cfg: float = 2.0, sampler="euler",
           scheduler: str = "simple", name: str = "reference"):
    """Samples of the given class labels through ComfyUI's real sampler; returns images [n, 1, H, W].
    ``sampler``: a sampler name, or a k-diffusion sampler function (model, x, sigmas, extra_args,
    callback, disable), run as ComfyUI's ``KSAMPLER`` at the scheduler's sigmas."""
    import comfy.sample
    import comfy.samplers
    if callable(sampler):
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).cpu()
        custom = comfy.samplers.KSAMPLER(sampler)
    images = []
    for label, seed in zip(labels, seeds):
        latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(latent_shape(name)))
        noise = comfy.sample.prepare_noise(latent, seed)
        positive, negative = conditioning(label), conditioning(NULL_CLASS)
        if callable(sampler):
            out = comfy.sample.sample_custom(patcher, noise, cfg, custom, sigmas.clone(), positive, negative,
                                             latent, disable_pbar=True, seed=seed)
        else:
            out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative,
                                      latent, disable_pbar=True, seed=seed)
        images.append(decode(out, name))
    return torch.cat(images)


def source_latents(labels) -> torch.Tensor:
    """Sampler-space latents [n, 16, 32, 32] of a centre crop of each label's photograph
    (the pictures an inpainting run edits)."""
    import comfy.latent_formats
    photos = load_photos()
    crops = []
    for label in labels:
        img = photos[label]
        y, x = (img.shape[0] - IMAGE_SIZE) // 2, (img.shape[1] - IMAGE_SIZE) // 2
        crops.append(img[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE])
    latent = to_latent(torch.stack(crops)[:, None], read_config()["pixel_mean"])
    return comfy.latent_formats.Flux().process_out(latent)


def inpaint(patcher, labels, seeds, mask: torch.Tensor, steps: int = 28, cfg: float = 2.0,
            sampler: str = "euler", scheduler: str = "simple"):
    """Inpainting through ComfyUI's real sampler: each label's photograph (source_latents)
    with ``mask`` (1 = regenerate, at latent or pixel resolution) regenerated as that class,
    as Set Latent Noise Mask does. Returns images [n, 1, H, W]."""
    import comfy.sample
    images = []
    for label, seed, latent in zip(labels, seeds, source_latents(labels)):
        latent = latent[None]
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, conditioning(label),
                                  conditioning(NULL_CLASS), latent, noise_mask=mask, disable_pbar=True, seed=seed)
        images.append(decode(out))
    return torch.cat(images)


def save_grid(rows: list[torch.Tensor], path, labels: list[str] | None = None, pad: int = 4):
    """rows: list of [n, 1, H, W] tensors in [0, 1] -> one PNG, a row per tensor."""
    from PIL import Image, ImageDraw
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    left = 110 if labels else 0
    grid = Image.new("L", (left + n * (w + pad) + pad, len(rows) * (h + pad) + pad), 255)
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels:
            draw.text((6, i * (h + pad) + pad + h // 2 - 6), labels[i], fill=0)
        for j in range(row.shape[0]):
            tile = Image.fromarray((row[j, 0].clamp(0, 1) * 255).round().byte().numpy(), "L")
            grid.paste(tile, (left + pad + j * (w + pad), pad + i * (h + pad)))
    grid.save(path)


def main(argv=None) -> int:
    """Write devkit/reference/samples.png: per class, real crops and samples."""
    import argparse
    from . import comfy_env
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--model", choices=list(MODELS), default="reference")
    args = ap.parse_args(argv)
    comfy_env.setup_comfyui()
    patcher = load_reference(args.model)
    grid_path = model_files(args.model)[2]
    photos = load_photos(args.model)
    mean = read_config(args.model)["pixel_mean"]
    g = torch.Generator().manual_seed(123)
    k = args.per_class
    rows, names = [], []
    for label, name in enumerate(MODELS[args.model]["classes"]):
        real = random_crops(photos, torch.full((k,), label), g)
        fake = sample(patcher, [label] * k, [label * 100 + i for i in range(k)], name=args.model)
        rows.append(torch.cat([real, fake]))
        names.append(f"{name}: real | samples")
    save_grid(rows, grid_path, names)
    print(f"wrote {grid_path} (per row: {k} training crops, then {k} samples; pixel mean {mean:.3f})")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
