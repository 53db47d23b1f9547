"""Train the toy world's measuring instruments (attribute classifier + identity embedding).

    python -m prcore.toyworld.train_instruments --out prcore/toyworld/weights/instruments.safetensors --seed 0

Training data: random world pictures (attribute labels) and random two-tone marked objects in 4
poses/backgrounds each (identity positives). The benchmark subjects themselves are excluded.
Loss: sum of per-head cross-entropies + InfoNCE on the identity embeddings,
``-log exp(e_i . e_j / tau) / sum_k exp(e_i . e_k / tau)`` for views i, j of the same object.
Prints held-out accuracy on freshly seeded pictures (also written next to the weights as JSON).

With ``--vae FOLDER`` (the toy model's AutoencoderKL) every training picture is also passed through
encode -> decode, and each sample is drawn clean or round-tripped with probability 1/2: generated
pictures are decoder outputs (softer than rendered ones), and the instruments must read both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prcore.toyworld import subjects, world
from prcore.toyworld.instruments import HEADS, IGNORE, InstrumentNet, color_target, labels_of, to_tensor


def random_identity(rng: np.random.Generator) -> world.Spec:
    """A random look of the base world (one- or two-toned, marked or not; never a benchmark subject)."""
    return replace(world.random_spec(rng, style_prob=0.0, two_tone_prob=0.6, mark_prob=0.6), background="white", seed=0)


def _identity_key(s: world.Spec) -> tuple:
    return world.identity_key(s)


def identity_views(spec: world.Spec, rng: np.random.Generator, n: int) -> list[world.Spec]:
    """``n`` pictures of one look: fresh pose and background each (never a background the object wears)."""
    out = []
    worn = {spec.color, spec.color2}
    for _ in range(n):
        while True:
            bg = world.random_spec(rng, style_prob=0.0).background
            if bg not in worn:
                break
        out.append(replace(spec, background=bg, seed=int(rng.integers(2**31))))
    return out


def identity_set(n: int, views: int, rng: np.random.Generator) -> tuple[np.ndarray, list[world.Spec]]:
    """n x views pictures of distinct random looks (benchmark subjects excluded)."""
    excluded = world.held_out_looks()
    seen: set[tuple] = set()
    specs: list[world.Spec] = []
    while len(seen) < n:
        s = random_identity(rng)
        k = _identity_key(s)
        if k in excluded or k in seen:
            continue
        seen.add(k)
        specs.extend(identity_views(s, rng, views))
    imgs = np.stack([np.asarray(world.render(s)) for s in specs])
    return imgs.reshape(n, views, world.SIZE, world.SIZE, 3), specs


def spec_labels(specs: list[world.Spec]) -> dict[str, torch.Tensor]:
    labels = {k: torch.tensor([labels_of(s)[k] for s in specs]) for k in HEADS}
    labels["color"] = color_target(specs)
    return labels


def world_set(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, torch.Tensor], list[world.Spec]]:
    specs = [world.random_spec(rng, style_prob=0.5) for _ in range(n)]
    imgs = np.stack([np.asarray(world.render(s)) for s in specs])
    return imgs, spec_labels(specs), specs


def head_losses(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = torch.zeros(())
    for k in HEADS:
        if k == "color":
            loss = loss + torch.sum(-labels[k] * F.log_softmax(logits[k], -1), -1).mean()
        elif (labels[k] != IGNORE).any():
            loss = loss + F.cross_entropy(logits[k], labels[k], ignore_index=IGNORE)
    return loss


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    logits = a @ b.T / tau
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def round_trip(vae, x: torch.Tensor, batch: int = 200) -> torch.Tensor:
    """encode -> decode (posterior mean), clamped to [-1, 1]."""
    if vae is None:
        return x
    out = [vae.decode(vae.encode(x[i : i + batch]).latent_dist.mean).sample.clamp(-1, 1) for i in range(0, x.shape[0], batch)]
    return torch.cat(out)


def _pick(clean: torch.Tensor, rt: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    use = torch.rand(clean.shape[0], generator=gen) < 0.5
    return torch.where(use[:, None, None, None], rt, clean)


def _aug(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _accuracies(logits: dict[str, torch.Tensor], specs: list[world.Spec], mask: torch.Tensor | None = None,
                suffix: str = "") -> dict[str, float]:
    from prcore.toyworld.instruments import attribute_correct

    out: dict[str, list[bool]] = {}
    for i, s in enumerate(specs):
        if mask is not None and not bool(mask[i]):
            continue
        pred = {k: HEADS[k][int(logits[k][i].argmax())] for k in HEADS}
        pred["colors_ranked"] = [HEADS["color"][int(j)] for j in logits["color"][i].argsort(descending=True)]
        for k, ok in attribute_correct(pred, s).items():
            out.setdefault(k, []).append(ok)
    return {f"acc_{k}{suffix}": float(np.mean(v)) for k, v in out.items()}


@torch.no_grad()
def evaluate(net: InstrumentNet, seed: int, n_world: int = 1500, n_ident: int = 200, vae=None) -> dict[str, float]:
    """Held-out accuracy per head on fresh world pictures (all styles, photo style, and round-tripped
    through ``vae`` if given); identity on fresh held-out looks (top-1 retrieval of a second view among
    ``n_ident``) and on fresh renders of the benchmark subjects against their references."""
    net.eval()
    rng = np.random.default_rng([seed, 99])
    imgs, labels, specs = world_set(n_world, rng)
    x = to_tensor(imgs)
    logits, _ = net(x)
    out = _accuracies(logits, specs)
    photo = labels["style"] == HEADS["style"].index("photo")
    out.update(_accuracies(logits, specs, photo, "_photo"))
    if vae is not None:
        logits_rt, _ = net(round_trip(vae, x))
        out.update(_accuracies(logits_rt, specs, None, "_roundtrip"))
    out["chance_background"] = 1 / len(HEADS["background"])
    out["chance_style"] = 1 / len(HEADS["style"])
    ids, _ = identity_set(n_ident, 2, rng)
    _, ea = net(to_tensor(ids[:, 0]))
    _, eb = net(to_tensor(ids[:, 1]))
    sim = ea @ eb.T
    out["identity_top1"] = float((sim.argmax(-1) == torch.arange(n_ident)).float().mean())
    out["identity_pos_cos"] = float(sim.diag().mean())
    out["identity_neg_cos"] = float((sim.sum() - sim.diag().sum()) / (n_ident * (n_ident - 1)))
    refs = [to_tensor(subjects.references(s)) for s in subjects.SUBJECTS]
    embs = [net(r)[1] for r in refs]
    same = np.mean([float((e @ e.T).sum() - e.shape[0]) / (e.shape[0] * (e.shape[0] - 1)) for e in embs])
    cross = np.mean([float((embs[i] @ embs[j].T).mean()) for i in range(len(embs)) for j in range(len(embs)) if i != j])
    out["subject_ref_cos_same"] = float(same)
    out["subject_ref_cos_other"] = float(cross)
    top = 0
    fresh_bgs = ("scene:night", "scene:snow", "red", "green", "yellow", "purple")
    for si, s in enumerate(subjects.SUBJECTS):
        fresh = to_tensor([s.render(background=bg, pose=(16.0, 1.0, 1.0, 8.0), seed=99) for bg in fresh_bgs])
        _, ef = net(fresh)
        sims = torch.stack([(ef @ e.T).mean(-1) for e in embs], -1)
        top += int((sims.argmax(-1) == si).sum())
    out["subject_fresh_top1"] = top / (len(subjects.SUBJECTS) * len(fresh_bgs))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-images", type=int, default=8000)
    ap.add_argument("--identities", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae", type=Path, default=None, help="AutoencoderKL folder: also train on its round trips")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    rng = np.random.default_rng([args.seed, 1])
    w_imgs, w_labels, _ = world_set(args.world_images, rng)
    i_imgs, i_specs = identity_set(args.identities, 4, rng)
    wx = to_tensor(w_imgs)
    ix = to_tensor(i_imgs.reshape(-1, world.SIZE, world.SIZE, 3)).reshape(args.identities, 4, 3, world.SIZE, world.SIZE)
    i_lab = spec_labels(i_specs)
    i_labels = {k: v.reshape(args.identities, 4, *v.shape[1:]) for k, v in i_lab.items()}
    vae = None
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval()
    wx_rt = round_trip(vae, wx)
    ix_rt = round_trip(vae, ix.reshape(-1, 3, world.SIZE, world.SIZE)).reshape(ix.shape)
    print(f"rendered in {time.time() - t0:.0f}s", flush=True)
    net = InstrumentNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    bw, bi = 96, 48
    for step in range(args.steps):
        net.train()
        wi = torch.randint(0, wx.shape[0], (bw,), generator=gen)
        ii = torch.randint(0, args.identities, (bi,), generator=gen)
        va = torch.randint(0, 4, (bi,), generator=gen)
        vb = (va + torch.randint(1, 4, (bi,), generator=gen)) % 4
        x = torch.cat([_aug(_pick(wx[wi], wx_rt[wi], gen), gen), _aug(_pick(ix[ii, va], ix_rt[ii, va], gen), gen),
                       _aug(_pick(ix[ii, vb], ix_rt[ii, vb], gen), gen)])
        logits, emb = net(x)
        loss = head_losses({k: v[:bw] for k, v in logits.items()}, {k: v[wi] for k, v in w_labels.items()})
        loss = loss + 0.5 * head_losses({k: v[bw:] for k, v in logits.items()},
                                        {k: torch.cat([v[ii, va], v[ii, vb]]) for k, v in i_labels.items()})
        loss = loss + info_nce(emb[bw:bw + bi], emb[bw + bi:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    net.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out))
    report = evaluate(net, args.seed + 1000, vae=vae)
    report["train_seconds"] = time.time() - t0
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
