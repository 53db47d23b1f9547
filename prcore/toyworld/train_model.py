"""Train the toy world's text-to-image model from scratch: a tiny Stable-Diffusion-architecture pipeline.

    python -m prcore.toyworld.train_model --out DIR --seed 0

Stages (all deterministic in ``--seed`` on one machine type):
  1. render ``--images`` world pictures and captions (``world.dataset``);
  2. train an AutoencoderKL (32x32x3 <-> 4x8x8) with L1+L2 reconstruction and a small KL term,
     then set ``scaling_factor = 1 / std(latents)`` so the diffusion model sees unit-variance latents;
  3. train a UNet2DConditionModel jointly with a small CLIPTextModel on the cached latent
     distributions: DDPM, epsilon prediction, loss ``|| eps - eps_theta(sqrt(abar_t) z0 + sqrt(1-abar_t) eps, t, c) ||^2``,
     captions dropped to "" with probability ``--caption-dropout`` (for classifier-free guidance),
     AdamW with warm-up, an EMA of the weights (the EMA is what is saved);
  4. fine-tune the VAE decoder alone (``--decoder-steps``; the encoder, hence the latent space, is fixed).
``--decoder-only``, ``--resume-from`` and ``--assemble-from`` run parts of this separately (docs/toyworld.md
lists the exact commands that made the shipped weights).
The output folder is a StableDiffusionPipeline written by ``save_pretrained`` (safetensors), with a
DDIMScheduler (SD 1.x betas, ``steps_offset=1``). Checkpoints go to ``DIR/checkpoints/step-N`` and
sample grids to ``DIR/grids`` during training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prcore.toyworld import world

TOKEN_LENGTH = 77
LATENT_FACTOR = 2  # 32x32 pictures <-> 4 x 16 x 16 latents
TEXT_WIDTH = 96


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,  # one downsampling: latent factor 2 (32x32 -> 16x16)
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.SIZE,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // LATENT_FACTOR,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 96, 128),  # 16x16 (convolutions only), 8x8 and 4x4 (cross-attention)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
        # the prompt also conditions every ResNet globally (attention-pooled text added to the time
        # embedding): background, style and colors are learnt far faster than through cross-attention alone
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from prcore.method.tiny import write_clip_tokenizer

    write_clip_tokenizer(folder, words=list(world.WORDS))
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="pt").input_ids


def _to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(imgs: torch.Tensor, *, steps: int, batch: int, lr: float, kl_weight: float, gen: torch.Generator, log,
              save_dir: Path | None = None, save_every: int = 250):
    """AutoencoderKL, L1 + L2 reconstruction + ``kl_weight`` x KL (per element), AdamW, cosine to 0.1 x lr.
    With ``save_dir``: a resumable checkpoint (``vae_ckpt.pt``: weights, optimizer, step, RNG) every
    ``save_every`` steps; a re-run continues from it."""
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n = imgs.shape[0]
    start = 0
    ck = save_dir / "vae_ckpt.pt" if save_dir is not None else None
    if ck is not None and ck.is_file():
        state = torch.load(ck, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        log(f"vae resumed at step {start}")
    t0 = time.time()
    vae.train()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = imgs[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} mse {F.mse_loss(rec, x).item():.4f} kl {kl.item():.3f} "
                f"{(time.time() - t0) / (step + 1 - start):.2f}s/step")
        if ck is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1}, ck)
    return vae.eval()


def finetune_decoder(vae, imgs: torch.Tensor, *, steps: int, batch: int, lr: float, gen: torch.Generator, log):
    """Stage 4: train only the decoder (and post_quant_conv) on latents of the frozen encoder.

    The latent space does not move, so this can run after (or beside) the UNet training; it is what
    sharpens the pictures. Loss: L1 + L2 between decode(z) and x, z ~ q(z|x).
    """
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = imgs.shape[0]
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = imgs[idx]
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps)))
        if step % 25 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def encode_all(vae, imgs: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, imgs.shape[0], batch):
        post = vae.encode(imgs[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def save_pipeline(out: Path, *, vae, unet, text_encoder, tokenizer, tok_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_dir / name, tmp / "tokenizer" / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


GRID_PROMPTS = [
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a yellow triangle at night",
    "a blue star in a field",
    "a white and black vertical split diamond in the desert",
    "a black cross with a white dot in the snow",
    "a red and green horizontal split square with a blue ring on a white background",
    "a purple circle on a green background in sketch style",
    "a orange triangle with a blue bar on a blue background in pixel style",
    "a green and yellow diagonal split circle on a red background in inverted style",
    "a blue square in a field in sepia style",
    "a red and blue vertical split circle with a yellow dot on a white background",
]


@torch.no_grad()
def sample_grid(path: Path, *, vae, unet, text_encoder, tokenizer, scale_factor: float, cfg: float = 5.0,
                steps: int = 15, seeds: int = 4) -> None:
    """Quick DDIM samples (rows: GRID_PROMPTS, columns: seeds) for eyeballing progress."""
    from PIL import Image

    sched = build_scheduler()
    sched.set_timesteps(steps)
    prompts = [p for p in GRID_PROMPTS for _ in range(seeds)]
    cond = text_encoder(tokenize(tokenizer, prompts))[0]
    unc = text_encoder(tokenize(tokenizer, [""] * len(prompts)))[0]
    g = torch.Generator().manual_seed(1234)
    lat = torch.randn(len(prompts), 4, world.SIZE // LATENT_FACTOR, world.SIZE // LATENT_FACTOR, generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([lat, lat]), t, torch.cat([unc, cond])).sample
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + cfg * (ec - eu), t, lat).prev_sample
    img = vae.decode(lat / scale_factor).sample.clamp(-1, 1).add(1).mul(127.5).round().byte()
    img = img.permute(0, 2, 3, 1).numpy()
    s = world.SIZE
    grid = img.reshape(len(GRID_PROMPTS), seeds, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(len(GRID_PROMPTS) * s, seeds * s, 3)
    Image.fromarray(grid).resize((seeds * s * 3, len(GRID_PROMPTS) * s * 3), Image.NEAREST).save(path)


@torch.no_grad()
def save_recon_grid(path: Path, vae, x: torch.Tensor) -> float:
    """Originals (odd columns) beside their reconstructions (posterior mean), 8 pairs a row; returns MSE."""
    from PIL import Image

    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pair = torch.stack([x, rec], 1).reshape(-1, 3, world.SIZE, world.SIZE)
    img = pair.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    s, cols = world.SIZE, 16
    rows = img.shape[0] // cols
    grid = img[: rows * cols].reshape(rows, cols, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, 3)
    Image.fromarray(grid).resize((cols * s * 3, rows * s * 3), Image.NEAREST).save(path)
    return float(F.mse_loss(rec, x))


def assemble(checkpoint: Path, vae_dir: Path, dest: Path) -> Path:
    """``dest`` <- the checkpoint pipeline with its VAE decoder replaced by ``vae_dir``'s (same
    encoder, so the UNet's latent space is unchanged; the checkpoint's scaling_factor is kept)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    for name, p in pipe.vae.encoder.state_dict().items():
        if not torch.equal(p, vae.encoder.state_dict()[name]):
            raise ValueError(f"{vae_dir} has a different encoder than {checkpoint} ({name}); its decoder does not fit")
    vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
    save_pipeline(dest, vae=vae.eval(), unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  tok_dir=checkpoint / "tokenizer")
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--vae-steps", type=int, default=450)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--vae-only", action="store_true", help="stage 2 only: train OUT/vae and stop")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--lr-floor", type=float, default=0.3, help="cosine schedule ends at this fraction of --lr")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting; 0: off")
    ap.add_argument("--high-noise-boost", type=float, default=1.0,
                    help="also weight the loss by min(1 / alphas_cumprod_t, this) (1: off)")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decoder-steps", type=int, default=0, help="stage 4: decoder-only fine-tuning steps")
    ap.add_argument("--decoder-only", action="store_true",
                    help="run only stage 4 on OUT/vae (the encoder stays fixed) and write OUT/vae_ft")
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse a trained VAE folder (e.g. an earlier run's OUT/vae)")
    ap.add_argument("--resume-from", type=Path, default=None,
                    help="continue from a checkpoint pipeline folder (its VAE, UNet, text encoder, tokenizer)")
    ap.add_argument("--assemble-from", type=Path, default=None,
                    help="write OUT/pipeline from this checkpoint folder + OUT/vae_ft (after --decoder-only)")
    args = ap.parse_args(argv)
    if args.assemble_from is not None:
        print(assemble(args.assemble_from, args.out / "vae_ft", args.out / "pipeline"))
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    log(f"args {vars(args)}")
    t_start = time.time()
    cache = out / f"dataset-{args.images}-{args.seed}.npz"
    if cache.is_file():  # a re-run of the same command reuses the rendered pictures
        with np.load(cache) as z:
            imgs_np, caps = z["images"], [str(c) for c in z["captions"]]
    else:
        imgs_np, caps, _ = world.dataset(args.images, seed=args.seed)
        np.savez(cache, images=imgs_np, captions=np.array(caps))
    imgs = _to_tensor(imgs_np)
    log(f"rendered {len(caps)} images in {time.time() - t_start:.0f}s")
    if args.decoder_only:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True)
        gen = torch.Generator().manual_seed(args.seed + 2)
        vae = finetune_decoder(vae, imgs, steps=args.decoder_steps, batch=args.vae_batch, lr=1e-3, gen=gen, log=log)
        vae.save_pretrained(out / "vae_ft", safe_serialization=True)
        log(f"decoder fine-tuned -> {out / 'vae_ft'}")
        return
    tok_dir = out / "_tokenizer"
    tokenizer = make_tokenizer(tok_dir)
    gen = torch.Generator().manual_seed(args.seed)

    if args.resume_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.resume_from / "vae", use_safetensors=True).eval()
        vae.register_to_config(scaling_factor=1.0)
    elif args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, use_safetensors=True).eval()
        vae.register_to_config(scaling_factor=1.0)
    else:
        torch.manual_seed(args.seed)
        vae = train_vae(imgs, steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr, kl_weight=args.kl_weight,
                        gen=torch.Generator().manual_seed(args.seed + 3), log=log, save_dir=out)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        if args.vae_only:
            save_recon_grid(out / "grids" / "vae_recon.png", vae, imgs[-64:])
            log(f"vae -> {out / 'vae'}")
            return
    for p in vae.parameters():
        p.requires_grad_(False)
    mean, std = encode_all(vae, imgs)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        rec = vae.decode(mean[:256]).sample
    log(f"vae recon mse {F.mse_loss(rec, imgs[:256]).item():.4f} latent std {mean.std().item():.3f} scaling_factor {scale:.4f}")

    ids = tokenize(tokenizer, caps)
    empty = tokenize(tokenizer, [""])[0]
    torch.manual_seed(args.seed + 1)
    if args.resume_from is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.resume_from / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(args.resume_from / "text_encoder", use_safetensors=True)
    else:
        unet = build_unet()
        text_encoder = build_text_encoder(tokenizer)
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    sched = build_scheduler()
    abar = sched.alphas_cumprod
    snr = abar / (1 - abar)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    n = imgs.shape[0]
    start = 0
    rewarm = -1  # after an optimizer restart: warm up again over --warmup steps from here
    state_file = out / "train_state.pt"  # exact resume: a re-run of the same command continues here
    if state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        grown = False
        for mod, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            missing, unexpected = mod.load_state_dict(st[key], strict=False)
            if unexpected or (missing and not all(k.startswith("add_embedding.") for k in missing)):
                raise ValueError(f"{state_file} does not fit this model: missing {missing}, unexpected {unexpected}")
            if missing:  # a state from before the global text embedding: it starts as a no-op
                grown = True
                with torch.no_grad():
                    mod.add_embedding.norm2.weight.zero_()
                    mod.add_embedding.norm2.bias.zero_()
        if grown:
            log("state had no add_embedding: added (zero-initialised output), optimizer state restarted")
            rewarm = st["step"]
        else:
            opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start = st["step"]
        log(f"resumed from {state_file} at step {start}")
    t0 = time.time()
    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        flip = torch.rand(args.batch, generator=gen) < 0.5
        z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)  # no caption says left/right
        tok = ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        tok[drop] = empty
        t = torch.randint(0, len(abar), (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, text_encoder(tok)[0]).sample
        per = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma > 0:  # min-SNR-gamma weighting (epsilon prediction): min(snr, gamma) / snr
            per = per * (snr[t].clamp(max=args.snr_gamma) / snr[t])
        if args.high_noise_boost > 1:  # x 1/abar_t (the v-loss factor), capped: the prompt decides the
            # picture at high noise, where an epsilon loss barely sees it
            per = per * (1.0 / abar[t]).clamp(max=args.high_noise_boost)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (step + 1) / args.warmup) if rewarm < 0 else min(1.0, (step + 1 - rewarm) / args.warmup)
        lr = args.lr * warm * (args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g_ in opt.param_groups:
            g_["lr"] = lr
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e_m, m in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p in zip(e_m.parameters(), m.parameters(), strict=False):
                    pe.lerp_(p, 1 - decay)
        if step % 25 == 0:
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {(time.time() - t0) / (step + 1 - start):.2f}s/step")
        last = step == args.steps - 1
        if (step + 1) % args.checkpoint_every == 0 or last:
            ck = out / "checkpoints" / f"step-{step + 1}"
            save_pipeline(ck, vae=vae, unet=ema_unet, text_encoder=ema_text, tokenizer=tokenizer, tok_dir=tok_dir)
            torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1},
                       state_file)
            sample_grid(out / "grids" / f"step-{step + 1}.png", vae=vae, unet=ema_unet, text_encoder=ema_text,
                        tokenizer=tokenizer, scale_factor=scale)
            log(f"checkpoint {ck}")
    if args.decoder_steps > 0:
        vae = finetune_decoder(vae, imgs, steps=args.decoder_steps, batch=args.vae_batch, lr=1e-3,
                               gen=torch.Generator().manual_seed(args.seed + 2), log=log)
    final = out / "pipeline"
    save_pipeline(final, vae=vae, unet=ema_unet, text_encoder=ema_text, tokenizer=tokenizer, tok_dir=tok_dir)
    (out / "train_summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "seconds": time.time() - t_start, "final_loss": loss.item()}))
    log(f"done in {time.time() - t_start:.0f}s -> {final}")


if __name__ == "__main__":
    main()
