"""A reference U-Net: ComfyUI's own UNetModel through its SD1.5 config class at a small size,
trained here on the reference model's photographs and classes, so that U-Net-only methods
(token pruning, ToMe) can be measured on learned dynamics.

    .venv/bin/python -m devkit.reference_unet --train      # about 18 minutes on 2 CPU cores

A 128x128 training crop, averaged down to 32x32 grayscale, becomes a 4x16x16 latent by 2x2
pixel unshuffle (SD1.5's latent layout at a size 2 CPU cores can train): 256 tokens at the
first level, 64 at the second. (At 1024 tokens a training step took 5 s here.) Trained
with SD1.5's own epsilon objective and noise schedule (ComfyUI's model_sampling), 10 % of the
labels dropped to the null class for cfg. Conditioning: the reference model's class
embeddings (4 context tokens of 32). Writes devkit/reference_unet/{unet_tiny.safetensors,
config.json, samples.png}."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import comfy_env
from .train_reference import init_plain_weights

HERE = Path(__file__).resolve().parent / "reference_unet"
WEIGHTS = HERE / "unet_tiny.safetensors"
CONFIG_FILE = HERE / "config.json"
CROP = 32
UNSHUFFLE = 2
DATA_SCALE = 2.0
UNET_CONFIG = dict(context_dim=32, model_channels=64, use_linear_in_transformer=False, adm_in_channels=None,
                   use_temporal_attention=False, use_checkpoint=False, image_size=16, out_channels=4,
                   use_spatial_transformer=True, legacy=False, in_channels=4, num_res_blocks=[1, 1],
                   channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                   transformer_depth_middle=1, num_head_channels=-1, num_heads=4, use_temporal_resblock=False)


def build(state_dict=None):
    import comfy.supported_models as sm
    from .tiny_models import load_into
    cfg = sm.SD15(dict(UNET_CONFIG))
    cfg.unet_config.update(num_heads=4, num_head_channels=-1)
    cfg.set_inference_dtype(torch.float32, None)
    return load_into(cfg, state_dict)


def load():
    from safetensors.torch import load_file
    return build(load_file(str(WEIGHTS)))


def to_latent(pixels, mean):
    """[B, 1, 128, 128] crops in [0, 1] -> model-space latents [B, 4, 16, 16]."""
    small = F.avg_pool2d(pixels, 128 // CROP)
    return F.pixel_unshuffle((small - mean) * DATA_SCALE, UNSHUFFLE)


def decode(samples):
    """The sampler's output (SD1.5 latent space) -> grayscale pictures [B, 1, 32, 32]."""
    import comfy.latent_formats
    mean = json.loads(CONFIG_FILE.read_text())["pixel_mean"]
    x = comfy.latent_formats.SD15().process_in(samples)
    return (F.pixel_shuffle(x, UNSHUFFLE) / DATA_SCALE + mean).clamp(0, 1)


def sample(patcher, labels, seeds, steps: int = 20, cfg: float = 3.0, sampler: str = "euler",
           scheduler: str = "normal"):
    import comfy.sample
    from . import reference_model as rm
    images = []
    for label, seed in zip(labels, seeds):
        latent = torch.zeros(1, 4, 16, 16)
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, rm.conditioning(label),
                                  rm.conditioning(rm.NULL_CLASS), latent, disable_pbar=True, seed=seed)
        images.append(decode(out))
    return torch.cat(images)


def train(steps: int, batch: int, lr: float, seed: int = 0):
    from safetensors.torch import save_file
    from . import reference_model as rm
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    photos = rm.load_photos()
    mean, std = rm.pixel_stats(photos)
    context, _ = rm.class_embeddings()
    patcher = build()
    base = patcher.model
    dm = base.diffusion_model
    init_plain_weights(dm, g)
    with torch.no_grad():
        dm.out[-1].weight.zero_()
    dm.train()
    ema = copy.deepcopy(dm).eval()
    opt = torch.optim.AdamW(dm.parameters(), lr=lr, weight_decay=0.01)
    alphas = 1.0 / (base.model_sampling.sigmas.float() ** 2 + 1.0)     # sigma^2 = (1 - a) / a
    started, losses = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        labels = torch.randint(0, len(rm.CLASSES), (batch,), generator=g)
        x0 = to_latent(rm.random_crops(photos, labels, g), mean)
        cond = torch.where(torch.rand(batch, generator=g) < 0.1, torch.full_like(labels, rm.NULL_CLASS), labels)
        t = torch.randint(0, len(alphas), (batch,), generator=g)
        a = alphas[t][:, None, None, None]
        eps = torch.randn(x0.shape, generator=g)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps         # = (x0 + sigma eps) / sqrt(sigma^2 + 1)
        pred = dm(xt, t.float(), context=context[cond])
        loss = (pred - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe_, p in zip(ema.parameters(), dm.parameters()):
                pe_.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            took = time.time() - started
            print(f"step {step:5d}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  {took:6.0f} s "
                  f"(about {took / (step + 1) * (steps - step - 1) / 60:.0f} min left)", flush=True)
    HERE.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in ema.state_dict().items()}, str(WEIGHTS))
    CONFIG_FILE.write_text(json.dumps({
        "unet_config": UNET_CONFIG, "config_class": "SD15", "crop": CROP, "unshuffle": UNSHUFFLE,
        "data_scale": DATA_SCALE, "pixel_mean": mean, "pixel_std": std, "classes": rm.CLASSES,
        "train": {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "objective": "epsilon (SD1.5 schedule)",
                  "final_loss": sum(losses[-100:]) / len(losses[-100:]), "seconds": round(time.time() - started, 1),
                  "torch": torch.__version__}}, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    comfy_env.setup_comfyui()
    if args.train:
        train(args.steps, args.batch, args.lr)
    from . import reference_model as rm
    patcher = load()
    labels = [i % len(rm.CLASSES) for i in range(16)]
    images = sample(patcher, labels, [700 + i for i in range(16)])
    photos = rm.load_photos()
    crops = torch.stack([F.avg_pool2d(rm.random_crops(photos, torch.tensor([lab]), torch.Generator().manual_seed(i)),
                                      128 // CROP)[0] for i, lab in enumerate(labels)])
    rm.save_grid([crops[:8], images[:8], crops[8:], images[8:]], HERE / "samples.png",
                 ["training crops", "samples", "training crops", "samples"])
    print(f"wrote {HERE / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
