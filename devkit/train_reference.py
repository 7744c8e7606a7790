"""Train the reference model (see reference_model.py) with rectified-flow matching.

    .venv/bin/python -m devkit.train_reference                         # ~40 min on 2 CPU cores
    .venv/bin/python -m devkit.train_reference --model reference_deep  # the 19-block model
    .venv/bin/python -m devkit.train_reference --model reference_wan --batch 24   # the held-out Wan model

Fixed seed; writes devkit/<model>/{flux_tiny.safetensors, config.json}. Resumable: a
checkpoint (model, EMA, optimiser, data generator) is written every ``--checkpoint-every``
steps to .cache/train/<model>/ and a rerun continues from it, with the same result as an
uninterrupted run."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import comfy_env


def init_weights(dm, g):
    if hasattr(dm, "blocks") and not hasattr(dm, "double_blocks"):
        return init_wan_weights(dm, g)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith(".scale"):           # RMSNorm
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.zero_()
        # adaLN-zero: every block starts as the identity, the output as zero
        for name, mod in dm.named_modules():
            if name.endswith("_mod.lin") or name.endswith("modulation.lin") or \
               name == "final_layer.adaLN_modulation.1" or name == "final_layer.linear":
                mod.weight.zero_()
                mod.bias.zero_()


def init_plain_weights(dm, g):
    """Matrices (and modulation tables) N(0, 0.02), norms' scales 1, biases 0."""
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def init_wan_weights(dm, g):
    """Wan: init_plain_weights, and the output projection zero, so the model starts by predicting
    nothing."""
    init_plain_weights(dm, g)
    with torch.no_grad():
        dm.head.head.weight.zero_()
        dm.head.head.bias.zero_()


# options that do not change the result (a checkpoint made with other values still resumes)
_NOT_RECIPE = ("checkpoint_every", "checkpoint_dir", "threads", "out", "stop_after")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="reference", help="reference (6 blocks), reference_deep (19 blocks) or "
                    "reference_wan (the held-out Wan model)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--checkpoint-dir", default=None, help="default: .cache/train/<model>")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--stop-after", type=int, default=0, help="stop (after a checkpoint) at this step, as a "
                    "session that ends would; a rerun resumes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    comfy_env.setup_comfyui()
    from . import reference_model as rm
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    photos = rm.load_photos(args.model)
    shift = rm.MODELS[args.model].get("train_shift", 1.0)
    mean, std = rm.pixel_stats(photos)
    context, pooled = rm.class_embeddings()

    patcher = rm.build_comfy_model(name=args.model)
    dm = patcher.model.diffusion_model
    init_weights(dm, g)
    dm.train()
    ema = copy.deepcopy(dm).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(dm.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = 100

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(args.steps - warm, 1)
        return 1e-5 + 0.5 * (args.lr - 1e-5) * (1 + math.cos(math.pi * p))

    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else comfy_env.PACK_ROOT / ".cache" / "train" / args.model
    ckpt_path = ckpt_dir / "checkpoint.pt"
    started = time.time()
    losses, first, spent = [], 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"] == {k: v for k, v in vars(args).items() if k not in _NOT_RECIPE}:
            dm.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["opt"])
            g.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            losses, first, spent = ck["losses"], ck["step"], ck["seconds"]
            print(f"resuming {args.model} from step {first} ({ckpt_path})", flush=True)
        else:
            print(f"ignoring {ckpt_path}: made with other settings", flush=True)

    def save_checkpoint(step):
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"args": {k: v for k, v in vars(args).items() if k not in _NOT_RECIPE},
                    "model": dm.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                    "step": step, "seconds": spent + time.time() - started}, tmp)
        tmp.replace(ckpt_path)

    for step in range(first, args.steps):
        labels = torch.randint(0, len(rm.MODELS[args.model]["classes"]), (args.batch,), generator=g)
        x0 = rm.to_latent(rm.random_crops(photos, labels, g), mean)
        cond_labels = torch.where(torch.rand(args.batch, generator=g) < 0.1,
                                  torch.full_like(labels, rm.NULL_CLASS), labels)
        t = rm.logit_normal_t(args.batch, g)
        t = shift * t / (1 + (shift - 1) * t)       # SD3's time shift (1: none)
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        target = noise - x0   # FLUX (CONST) parameterisation: x0 = x_t - sigma * v
        pred = rm.training_forward(args.model, patcher, xt, t, context[cond_labels], pooled[cond_labels])
        loss = (pred - target).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe_, p in zip(ema.parameters(), dm.parameters()):
                pe_.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            took = time.time() - started
            left = took / (step + 1 - first) * (args.steps - step - 1)
            print(f"step {step:5d}/{args.steps}  loss {recent:.4f}  lr {lr_at(step):.2e}  {spent + took:7.1f} s"
                  f"  (about {left / 60:.0f} min left)", flush=True)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_checkpoint(step + 1)
        if args.stop_after and step + 1 == args.stop_after:
            save_checkpoint(step + 1)
            print(f"stopped at step {step + 1}; rerun to resume", flush=True)
            return 0

    weights, config_file, _ = rm.model_files(args.model)
    out_dir = weights.parent if args.out is None else Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in ema.state_dict().items()}
    save_file(state, str(out_dir / weights.name))
    config = {
        "unet_config": rm.MODELS[args.model]["unet"], "classes": rm.MODELS[args.model]["classes"], "null_class": rm.NULL_CLASS,
        "txt_tokens": rm.TXT_TOKENS, "image_size": rm.IMAGE_SIZE, "unshuffle": rm.UNSHUFFLE,
        "data_scale": rm.DATA_SCALE, "pixel_mean": mean, "pixel_std": std, "cond_seed": rm.COND_SEED,
        "train": {"steps": args.steps, "batch": args.batch, "time_shift": shift, "lr": args.lr, "seed": args.seed, "ema": args.ema,
                  "final_loss": sum(losses[-100:]) / len(losses[-100:]),
                  "seconds": round(spent + time.time() - started, 1), "torch": torch.__version__},
    }
    (out_dir / config_file.name).write_text(json.dumps(config, indent=1))
    print(f"saved to {out_dir} in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
