"""The consistency window in the toy world: alignment, fidelity and UNet rows per image for a sweep
of windows against the whole trajectory.

Every subject gets its DCO LoRA through the product's ``train_subject_lora`` (the toy-world
benchmark's settings); every image is sampled by ``prcore.method.sampler.sample`` with
parallel-rescaled guidance and the window ``[start, stop)`` (outside it two rows,
``e_u + w_cfg (e_p - e_u)``) and scored by the toy world's instruments. Paired differences against
the full window (same subjects, prompts, seeds), 95% CIs over (subject, prompt) cells.

    python benchmarks/consistency_window.py --out benchmarks/results/window      # 6 subjects x 12 prompts x 4 seeds
    python benchmarks/consistency_window.py --quick --out /tmp/w                 # 2 subjects x 2 prompts x 2 seeds

Last line: ``window_rows_ratio=<rows of the chosen window / rows of the full trajectory>``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("toyworld_bench", REPO / "benchmarks" / "toyworld_personalization.py")
tw = importlib.util.module_from_spec(_spec)
sys.modules["toyworld_bench"] = tw  # its dataclasses look their module up
_spec.loader.exec_module(tw)  # the toy-world benchmark's prompts and CI helpers

WINDOWS = ((0.0, 1.0), (0.0, 0.7), (0.0, 0.5), (0.0, 0.3), (0.3, 1.0), (0.2, 0.7))
# which two rows run outside the window: the product's (CFG of the LoRA model on the personal prompt,
# guidance.PERSONAL_CFG) for every window, and the alternative (CFG of the pretrained model on the
# base prompt: the subject is absent for those steps) for the two cheapest early windows
OUTSIDE_ALTERNATIVE = ((0.0, 0.5), (0.0, 0.3))


@contextlib.contextmanager
def pretrained_outside(guidance: str):
    """Benchmark only: run ``guidance`` with the pretrained model's CFG outside the window."""
    from dataclasses import replace

    from prcore.method import guidance as G

    saved = G.MODES[guidance]
    G.MODES[guidance] = replace(saved, outside=G.MODES["pretrained"])
    try:
        yield
    finally:
        G.MODES[guidance] = saved


def paired(scores: pl.DataFrame, window: str, column: str) -> tuple[float, float]:
    """Mean and 95% CI half-width of (window - full) over (subject, prompt) cells."""
    full = scores.filter(pl.col("window") == "0-1").select("subject", "prompt_id", "seed", pl.col(column).alias("full"))
    this = scores.filter(pl.col("window") == window).select("subject", "prompt_id", "seed", column)
    joined = this.join(full, on=["subject", "prompt_id", "seed"]).with_columns((pl.col(column) - pl.col("full")).alias("d"))
    cells = joined.group_by(["subject", "prompt_id"]).agg(pl.col("d").mean())["d"].to_numpy()
    if len(cells) < 2:
        return float(cells.mean()) if len(cells) else float("nan"), float("nan")
    return float(cells.mean()), tw._t975(len(cells) - 1) * float(cells.std(ddof=1)) / math.sqrt(len(cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--prompts-per-kind", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--consistency-scale", type=float, default=3.0)
    ap.add_argument("--parallel-scale", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="toy-world pipeline folder (default: the shipped one)")
    args = ap.parse_args(argv)
    if args.quick:
        args.subjects, args.prompts_per_kind, args.seeds = 2, 1, 2

    import torch

    from prcore.data.schema import TrainConfig
    from prcore.method.dco import train_subject_lora
    from prcore.method.lora_io import load_subject_lora, unload_subject_lora
    from prcore.method.models import load_pipeline
    from prcore.method.sampler import sample
    from prcore.toyworld import IDENTIFIER, model_path, subjects
    from prcore.toyworld.instruments import ToyScorer

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model or model_path(), device="cpu", dtype="float32")
    scorer = ToyScorer()
    prompts = [(i, p, "plain") for i, p in enumerate(tw.PLAIN_PROMPTS[: args.prompts_per_kind])]
    prompts += [(len(tw.PLAIN_PROMPTS) + i, p, "stylized") for i, p in enumerate(tw.STYLIZED_PROMPTS[: args.prompts_per_kind])]
    rows, t0 = [], time.time()
    for s in subjects.SUBJECTS[: args.subjects]:
        refs = subjects.references(s)
        ref_emb = scorer.embed_references(refs)
        cfg = TrainConfig(steps=80, learning_rate=2e-3, rank=4, alpha=4.0, batch_size=2, dco_beta=1000.0, seed=0)
        res = train_subject_lora(pipe, images=refs, class_noun=s.class_noun, identifier=IDENTIFIER,
                                 out_dir=args.out / "loras" / s.subject_id, captions=subjects.reference_captions(s),
                                 config=cfg, progress=False)
        load_subject_lora(pipe, res.out_dir, "w")
        try:
            for pid, template, kind in prompts:
                for start, stop, alt in [(a, b, False) for a, b in WINDOWS] + [(a, b, True) for a, b in OUTSIDE_ALTERNATIVE]:
                    with pretrained_outside("parallel_rescaled") if alt else contextlib.nullcontext():
                        o = sample(pipe, prompt=template, class_noun=s.class_noun, identifier=IDENTIFIER, adapter_name="w",
                                   guidance_scale=args.guidance_scale, consistency_scale=args.consistency_scale,
                                   parallel_scale=args.parallel_scale, num_inference_steps=args.steps, seed=list(range(args.seeds)),
                                   num_images=args.seeds, consistency_start=start, consistency_stop=stop, progress=False)
                    name = f"{start:g}-{stop:g}" + (" pretrained-outside" if alt else "")
                    for seed, sc in zip(range(args.seeds), scorer.score(o.images, o.base_prompt, ref_emb), strict=True):
                        rows.append({"subject": s.subject_id, "prompt_id": pid, "kind": kind, "window": name,
                                     "rows_per_step": o.unet_rows / args.steps, "seed": seed, **sc})
        finally:
            unload_subject_lora(pipe, "w")
        print(f"{s.subject_id}: {len(rows)} images, {time.time() - t0:.0f}s", flush=True)
    scores = pl.DataFrame(rows)
    scores.write_parquet(args.out / "window_scores.parquet")
    lines = [f"# Consistency window sweep ({scores.height} images, {time.time() - t0:.0f} s)", "",
             f"`python benchmarks/consistency_window.py {' '.join(sys.argv[1:])}`; parallel-rescaled, w_cfg {args.guidance_scale}, "
             f"w_cg {args.consistency_scale}, eta {args.parallel_scale}, {args.steps} DDIM steps. ± = 95% CI over (subject, prompt) cells.", "",
             "| window [start, stop) | UNet rows / image / step | alignment | fidelity | Δ alignment vs full | Δ fidelity vs full |",
             "|---|---|---|---|---|---|"]
    summary = []
    for start, stop, alt in [(a, b, False) for a, b in WINDOWS] + [(a, b, True) for a, b in OUTSIDE_ALTERNATIVE]:
        w = f"{start:g}-{stop:g}" + (" pretrained-outside" if alt else "")
        sub = scores.filter(pl.col("window") == w)
        a, a_ci, _ = tw.cell_ci(sub, "alignment")
        f, f_ci, _ = tw.cell_ci(sub, "fidelity")
        da, da_ci = paired(scores, w, "alignment")
        df, df_ci = paired(scores, w, "fidelity")
        rows_per_step = float(sub["rows_per_step"].mean())
        summary.append({"window": w, "rows_per_step": rows_per_step, "alignment": a, "alignment_ci": a_ci, "fidelity": f,
                        "fidelity_ci": f_ci, "d_alignment": da, "d_alignment_ci": da_ci, "d_fidelity": df, "d_fidelity_ci": df_ci})
        summary[-1]["outside"] = "pretrained_cfg" if alt else "personal_cfg"
        lines.append(f"| [{start:g}, {stop:g}){' (pretrained CFG outside)' if alt else ''} | {rows_per_step:.2f} | {a:.3f} ± {a_ci:.3f} | {f:.3f} ± {f_ci:.3f} "
                     f"| {da:+.4f} ± {da_ci:.4f} | {df:+.4f} ± {df_ci:.4f} |")
    # the cheapest window whose paired differences are inside the full trajectory's CIs (both metrics)
    full = summary[0]
    ok = [r for r in summary if r["outside"] == "personal_cfg"
          and abs(r["d_alignment"]) <= full["alignment_ci"] and abs(r["d_fidelity"]) <= full["fidelity_ci"]]
    chosen = min(ok, key=lambda r: r["rows_per_step"]) if ok else full
    lines += ["", f"Cheapest window within the full trajectory's CIs on both metrics: **[{chosen['window'].replace('-', ', ')})**, "
              f"{chosen['rows_per_step']:.2f} rows per image per step ({chosen['rows_per_step'] / 3:.2f} of the full 3)."]
    (args.out / "window.md").write_text("\n".join(lines) + "\n")
    (args.out / "window_summary.json").write_text(json.dumps({"windows": summary, "chosen": chosen}, indent=2))
    print("\n".join(lines))
    print(f"window_rows_ratio={chosen['rows_per_step'] / 3:.3f}")


if __name__ == "__main__":
    main()
