"""DreamBench-style personalization benchmark in the toy world (issue 5).

    python benchmarks/toyworld_personalization.py            # full protocol, writes benchmarks/results/
    python benchmarks/toyworld_personalization.py --quick    # CI smoke run (~1-2 min), writes to --out

Protocol: K subjects (prcore.toyworld.subjects, 4 references each) x P prompts (plain scenes and
stylized, reported separately) x N seeds. Every subject gets two LoRAs trained through the product
(:func:`prcore.method.dco.train_subject_lora`): DreamBooth loss (``dco_beta=0``) and DCO. Methods,
all sampled through :func:`prcore.method.sampler.sample` at the same CFG scale:

    pretrained      base model, class-noun prompt
    db_cfg          DreamBooth LoRA + CFG
    dco_cfg         DCO LoRA + CFG
    dco_cons@w      DCO + consistency guidance (parallel_scale = 1), consistency scale w
    dco_par{eta}@w  DCO + parallel-rescaled guidance, parallel_scale eta, consistency scale w

Scores come from the toy world's instruments through the product's scorer interface
(:class:`prcore.toyworld.instruments.ToyScorer`): alignment = mean classifier probability of the
prompt's background/scene and style; fidelity = mean cosine of identity embeddings to the references.
95% confidence intervals: t-interval over the (subject, prompt) cell means (images of one cell are
not independent). Last line printed: ``name=toyworld_personalization``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prcore.toyworld import IDENTIFIER, model_path, subjects  # noqa: E402

PLAIN_PROMPTS = (
    "a {subject} on a red background",
    "a {subject} on a yellow background",
    "a {subject} on a green background",
    "a {subject} on a purple background",
    "a {subject} at night",
    "a {subject} in the snow",
)
STYLIZED_PROMPTS = (
    "a {subject} in sketch style",
    "a {subject} in pixel style",
    "a {subject} in inverted style",
    "a {subject} in sepia style",
    "a {subject} on a blue background in pixel style",
    "a {subject} in the snow in inverted style",
)


@dataclass(frozen=True)
class Setting:
    method: str  # pretrained | db_cfg | dco_cfg | dco_cons | dco_par
    guidance: str
    lora: str | None  # "db" | "dco" | None
    consistency_scale: float = 0.0
    parallel_scale: float = 1.0

    @property
    def label(self) -> str:
        if self.method == "dco_cons":
            return f"dco_cons@{self.consistency_scale:g}"
        if self.method == "dco_par":
            return f"dco_par{self.parallel_scale:g}@{self.consistency_scale:g}"
        return self.method


def setting_words(st: Setting, cfg: float) -> str:
    if st.method == "pretrained":
        return f"base model, CFG {cfg:g}"
    if st.method in ("db_cfg", "dco_cfg"):
        return f"{'DreamBooth' if st.lora == 'db' else 'DCO'} LoRA, CFG {cfg:g}"
    if st.method == "dco_cons":
        return f"DCO, CFG {cfg:g} + consistency w {st.consistency_scale:g}"
    return f"DCO, CFG {cfg:g} + parallel-rescaled w {st.consistency_scale:g} eta {st.parallel_scale:g}"


def settings(consistency_scales: tuple[float, ...], parallel_scales: tuple[float, ...], dreambooth: bool = True) -> list[Setting]:
    out = [Setting("pretrained", "pretrained", None)]
    if dreambooth:
        out.append(Setting("db_cfg", "cfg", "db"))
    out.append(Setting("dco_cfg", "cfg", "dco"))
    for w in consistency_scales:
        out.append(Setting("dco_cons", "consistency", "dco", w, 1.0))
        for eta in parallel_scales:
            out.append(Setting("dco_par", "parallel_rescaled", "dco", w, eta))
    return out


def _t975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table for small dof, normal limit beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             11: 2.201, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
    if dof <= 0:
        return float("nan")
    keys = sorted(table)
    for k in keys:
        if dof <= k:
            return table[k]
    return 1.960


def cell_ci(df: pl.DataFrame, column: str) -> tuple[float, float, int]:
    """Mean of ``column`` and its 95% CI half-width over (subject, prompt) cell means."""
    cells = df.group_by(["subject", "prompt_id"]).agg(pl.col(column).mean())[column].to_numpy()
    n = len(cells)
    m = float(cells.mean())
    if n < 2:
        return m, float("nan"), n
    return m, _t975(n - 1) * float(cells.std(ddof=1)) / math.sqrt(n), n


def summarize(scores: pl.DataFrame) -> pl.DataFrame:
    rows = []
    order = list(dict.fromkeys(scores["setting"].to_list()))
    for label in order:
        s = scores.filter(pl.col("setting") == label)
        first = s.row(0, named=True)
        for split in ("all", "plain", "stylized"):
            part = s if split == "all" else s.filter(pl.col("kind") == split)
            if part.height == 0:
                continue
            a, a_ci, cells = cell_ci(part, "alignment")
            f, f_ci, _ = cell_ci(part, "fidelity")
            i_, i_ci, _ = cell_ci(part, "identified") if "identified" in part.columns else (float("nan"),) * 3
            c_, c_ci, _ = cell_ci(part, "identified_in_class") if "identified_in_class" in part.columns else (float("nan"),) * 3
            rows.append({"setting": label, "method": first["method"], "consistency_scale": first["consistency_scale"],
                         "parallel_scale": first["parallel_scale"], "split": split, "alignment": a, "alignment_ci": a_ci,
                         "fidelity": f, "fidelity_ci": f_ci, "identified": i_, "identified_ci": i_ci,
                         "identified_in_class": c_, "identified_in_class_ci": c_ci, "images": part.height, "cells": cells})
    return pl.DataFrame(rows)


def matched_fidelity(table: pl.DataFrame, split: str) -> list[dict]:
    """For each parallel-rescaled point: the consistency curve's alignment at the same fidelity
    (linear interpolation along the consistency-scale sweep) and the difference."""
    t = table.filter(pl.col("split") == split)
    cons = t.filter(pl.col("method") == "dco_cons").sort("fidelity")
    f_c, a_c = cons["fidelity"].to_numpy(), cons["alignment"].to_numpy()
    out = []
    for r in t.filter(pl.col("method") == "dco_par").iter_rows(named=True):
        inside = len(f_c) >= 2 and f_c[0] <= r["fidelity"] <= f_c[-1]
        a_at = float(np.interp(r["fidelity"], f_c, a_c)) if inside else float("nan")
        out.append({"setting": r["setting"], "fidelity": r["fidelity"], "alignment": r["alignment"],
                    "cons_alignment_at_fidelity": a_at, "delta_alignment": r["alignment"] - a_at if inside else float("nan")})
    return out


def paired_vs_consistency(scores: pl.DataFrame, split: str) -> list[dict]:
    """Same seeds, same subject and prompt: parallel-rescaled (eta, w) minus consistency (w), per image,
    averaged per (subject, prompt) cell; mean and 95% CI over cells, for alignment and fidelity."""
    s = scores if split == "all" else scores.filter(pl.col("kind") == split)
    keys = ["subject", "prompt_id", "seed"]
    out = []
    for w in sorted(set(s.filter(pl.col("method") == "dco_cons")["consistency_scale"].to_list())):
        cons = s.filter((pl.col("method") == "dco_cons") & (pl.col("consistency_scale") == w)).select(
            keys + [pl.col("alignment").alias("a_c"), pl.col("fidelity").alias("f_c")])
        par = s.filter((pl.col("method") == "dco_par") & (pl.col("consistency_scale") == w))
        for eta in sorted(set(par["parallel_scale"].to_list())):
            j = par.filter(pl.col("parallel_scale") == eta).join(cons, on=keys)
            j = j.with_columns((pl.col("alignment") - pl.col("a_c")).alias("d_alignment"),
                               (pl.col("fidelity") - pl.col("f_c")).alias("d_fidelity"))
            da, da_ci, _ = cell_ci(j, "d_alignment")
            df, df_ci, _ = cell_ci(j, "d_fidelity")
            out.append({"consistency_scale": w, "parallel_scale": eta, "d_alignment": da, "d_alignment_ci": da_ci,
                        "d_fidelity": df, "d_fidelity_ci": df_ci, "images": j.height})
    return out


def paired_markdown(scores: pl.DataFrame) -> str:
    lines = ["| split | w | eta | Δ alignment (95% CI) | Δ fidelity (95% CI) |", "|---|---|---|---|---|"]
    for split in ("all", "plain", "stylized"):
        for r in paired_vs_consistency(scores, split):
            lines.append(f"| {split} | {r['consistency_scale']:g} | {r['parallel_scale']:g} | "
                         f"{r['d_alignment']:+.4f} ± {r['d_alignment_ci']:.4f} | {r['d_fidelity']:+.4f} ± {r['d_fidelity_ci']:.4f} |")
    return "\n".join(lines)


def choose_default(table: pl.DataFrame) -> dict:
    """The DCO guided setting (consistency or parallel-rescaled) with the best balance:
    max of (a - a_min)/(a_max - a_min) + (f - f_min)/(f_max - f_min) over those settings (split "all")."""
    t = table.filter((pl.col("split") == "all") & pl.col("method").is_in(["dco_cons", "dco_par"]))
    a, f = t["alignment"].to_numpy(), t["fidelity"].to_numpy()
    norm = lambda v: (v - v.min()) / (v.max() - v.min() + 1e-12)  # noqa: E731
    best = int(np.argmax(norm(a) + norm(f)))
    return t.row(best, named=True)


def personalization_figures(table: pl.DataFrame, scores: pl.DataFrame | None) -> dict:
    """Plain prompts: identification top-1 per setting, and the fidelity gap of every DCO setting over
    the pretrained model (paired by subject, prompt and seed when the scores are at hand)."""
    t = table.filter(pl.col("split") == "plain")
    out: dict = {"identified": {r["setting"]: [r["identified"], r["identified_ci"]] for r in t.iter_rows(named=True)},
                 "identified_in_class": {r["setting"]: [r["identified_in_class"], r["identified_in_class_ci"]]
                                         for r in t.iter_rows(named=True)}}
    pre = t.filter(pl.col("setting") == "pretrained")
    if pre.height:
        f0 = pre["fidelity"][0]
        out["fidelity_gap"] = {r["setting"]: r["fidelity"] - f0 for r in t.iter_rows(named=True) if r["setting"] != "pretrained"}
    if scores is not None and pre.height:
        keys = ["subject", "prompt_id", "seed"]
        sp = scores.filter(pl.col("kind") == "plain")
        base = sp.filter(pl.col("setting") == "pretrained").select(keys + [pl.col("fidelity").alias("f0")])
        gaps = {}
        for label in dict.fromkeys(sp["setting"].to_list()):
            if label == "pretrained":
                continue
            j = sp.filter(pl.col("setting") == label).join(base, on=keys).with_columns((pl.col("fidelity") - pl.col("f0")).alias("gap"))
            m, ci, _ = cell_ci(j, "gap")
            gaps[label] = [m, ci]
        out["fidelity_gap_paired"] = gaps
    return out


def figures_markdown(fig: dict) -> str:
    lines = ["| setting (plain prompts) | identified, top-1 of the 6 subjects (95% CI) | identified, top-1 of 6 looks on its shape (95% CI) "
             "| fidelity gap over pretrained (95% CI, paired) |",
             "|---|---|---|---|"]
    for label, (v, ci) in fig["identified"].items():
        gap = fig.get("fidelity_gap_paired", {}).get(label)
        g = f"{gap[0]:+.3f} ± {gap[1]:.3f}" if gap else "—"
        c, c_ci = fig["identified_in_class"][label]
        lines.append(f"| {label} | {v:.2f} ± {ci:.2f} | {c:.2f} ± {c_ci:.2f} | {g} |")
    return "\n".join(lines)


def table_markdown(table: pl.DataFrame) -> str:
    lines = ["| setting | split | alignment (95% CI) | fidelity (95% CI) | identified top-1 of 6 subjects (95% CI) "
             "| identified top-1 of 6 looks on its shape (95% CI) | images |",
             "|---|---|---|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        lines.append(f"| {r['setting']} | {r['split']} | {r['alignment']:.3f} ± {r['alignment_ci']:.3f} | "
                     f"{r['fidelity']:.3f} ± {r['fidelity_ci']:.3f} | {r['identified']:.2f} ± {r['identified_ci']:.2f} | "
                     f"{r['identified_in_class']:.2f} ± {r['identified_in_class_ci']:.2f} | {r['images']} |")
    return "\n".join(lines)


def pareto_plot(table: pl.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = ["all", "plain", "stylized"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, split in zip(axes, splits, strict=False):
        t = table.filter(pl.col("split") == split)
        for method, marker in (("pretrained", "s"), ("db_cfg", "D"), ("dco_cfg", "^")):
            r = t.filter(pl.col("method") == method)
            if r.height:
                ax.scatter(r["alignment"], r["fidelity"], marker=marker, s=60, label=method, zorder=3)
        curves = [("dco_cons", 1.0, "consistency (eta=1)")]
        curves += [("dco_par", eta, f"parallel-rescaled eta={eta:g}")
                   for eta in sorted(set(t.filter(pl.col("method") == "dco_par")["parallel_scale"].to_list()))]
        for method, eta, label in curves:
            r = t.filter((pl.col("method") == method) & (pl.col("parallel_scale") == eta)).sort("consistency_scale")
            if r.height:
                ax.plot(r["alignment"], r["fidelity"], marker="o", label=label)
                for x, y, w in zip(r["alignment"], r["fidelity"], r["consistency_scale"], strict=False):
                    ax.annotate(f"{w:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{split} prompts")
        ax.set_xlabel("prompt alignment (classifier prob.)")
        ax.set_ylabel("subject fidelity (identity cosine)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Toy world: fidelity vs alignment (labels: consistency scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_sheet(rows: list[tuple[str, str, list, list[str]]], refs: list, path: Path, title: str = "") -> None:
    """One subject: references in the first row, then one row per (setting, prompt): its label (setting
    and guidance, the prompt sampled) and its images, each with its fidelity (``*``: identified as this
    subject, top-1 among all subjects' references)."""
    from PIL import Image, ImageDraw

    s, z = 32, 3  # pictures drawn 3x
    cell = s * z + 6
    label_w = 430
    width = max([len(refs)] + [len(r[2]) for r in rows])
    line_h = cell + 12
    sheet = Image.new("RGB", (max(label_w + width * cell, 8 + 6 * len(title)), 18 + (len(rows) + 1) * line_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black")

    def put(j: int, label: str, prompt: str, ims: list, notes: list[str]) -> None:
        y = 18 + j * line_h
        draw.text((4, y + 20), label, fill="black")
        draw.text((4, y + 40), prompt, fill=(60, 60, 160))
        for i, im in enumerate(ims):
            sheet.paste(im.convert("RGB").resize((s * z, s * z), Image.NEAREST), (label_w + i * cell, y))
            if notes:
                draw.text((label_w + i * cell + 2, y + s * z), notes[i], fill="black")

    put(0, "references", "", refs, [])
    for j, (label, prompt, ims, notes) in enumerate(rows, start=1):
        put(j, label, prompt, ims, notes)
    sheet.save(path)


def run(args: argparse.Namespace) -> dict:
    import torch

    from prcore.data.schema import TrainConfig
    from prcore.method.dco import train_subject_lora
    from prcore.method.lora_io import load_subject_lora, unload_subject_lora
    from prcore.method.models import load_pipeline
    from prcore.method.sampler import sample
    from prcore.toyworld.instruments import ToyScorer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or out / "work")
    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    scorer = ToyScorer()
    subj = list(subjects.SUBJECTS[: args.subjects])
    prompts = [(i, p, "plain") for i, p in enumerate(PLAIN_PROMPTS[: args.prompts_per_kind])]
    prompts += [(len(PLAIN_PROMPTS) + i, p, "stylized") for i, p in enumerate(STYLIZED_PROMPTS[: args.prompts_per_kind])]
    plan = settings(tuple(args.consistency_scales), tuple(args.parallel_scales), dreambooth=not args.skip_dreambooth)
    seeds = list(range(args.seeds))
    t0 = time.time()
    rows: list[dict] = []
    train_seconds = 0.0
    sheet_prompts = set(args.sheet_prompts)
    all_refs = {x.subject_id: scorer.embed_references(subjects.references(x)) for x in subjects.SUBJECTS}
    for s in subj:
        refs = subjects.references(s)
        ref_emb = all_refs[s.subject_id]
        class_refs = {s.subject_id: ref_emb, **{a.subject_id: scorer.embed_references(subjects.references(a))
                                                for a in subjects.look_alikes(s)}}
        adapters = {}
        for kind, beta in ((("db", 0.0),) if not args.skip_dreambooth else ()) + (("dco", args.dco_beta),):
            cfg = TrainConfig(steps=args.lora_steps, learning_rate=args.lora_lr, rank=args.lora_rank, alpha=float(args.lora_rank),
                              batch_size=args.lora_batch, dco_beta=beta, seed=0)
            res = train_subject_lora(pipe, images=refs, class_noun=s.class_noun, identifier=IDENTIFIER,
                                     out_dir=work / "loras" / f"{s.subject_id}-{kind}",
                                     captions=subjects.reference_captions(s), config=cfg, progress=False)
            train_seconds += 0.0 if res.reused else res.seconds_total
            name = f"{s.subject_id}_{kind}"
            load_subject_lora(pipe, res.out_dir, name)
            adapters[kind] = name
        sheet_rows: list[tuple[str, list]] = []
        for pid, template, kind in prompts:
            if args.sheets_only and pid not in sheet_prompts:
                continue
            for st in plan:
                if args.sheets_only and st.label not in args.sheet_settings:
                    continue
                o = sample(pipe, prompt=template, class_noun=s.class_noun, identifier=IDENTIFIER,
                           adapter_name=adapters[st.lora] if st.lora else None, guidance=st.guidance,
                           guidance_scale=args.guidance_scale, consistency_scale=st.consistency_scale or 0.0,
                           parallel_scale=st.parallel_scale, num_inference_steps=args.steps, seed=seeds,
                           num_images=len(seeds), progress=False)
                scores = scorer.score(o.images, o.base_prompt, ref_emb)
                ident = scorer.identify(o.images, all_refs)
                ident_class = scorer.identify(o.images, class_refs)
                for seed, sc, idn, idc in zip(o.seeds, scores, ident, ident_class, strict=False):
                    others = max(v for k, v in idn["sims"].items() if k != s.subject_id)
                    rows.append({"subject": s.subject_id, "prompt_id": pid, "prompt": template, "kind": kind,
                                 "setting": st.label, "method": st.method, "guidance": st.guidance,
                                 "consistency_scale": st.consistency_scale, "parallel_scale": st.parallel_scale,
                                 "guidance_scale": args.guidance_scale, "seed": seed, **sc,
                                 "identified": float(idn["subject"] == s.subject_id), "id_margin": sc["fidelity"] - others,
                                 "identified_in_class": float(idc["subject"] == s.subject_id)})
                if pid in sheet_prompts and st.label in args.sheet_settings:
                    prompt_text = o.personal_prompt if st.lora else o.base_prompt
                    sheet_rows.append((f"{st.label}: {setting_words(st, args.guidance_scale)}", prompt_text, o.images,
                                       [f"{r['fidelity']:.2f}{'*' if i['subject'] == s.subject_id else ''}"
                                        for r, i in zip(scores, ident, strict=False)]))
        if sheet_rows:
            sample_sheet(sheet_rows, refs, out / f"toyworld_sheet_{s.subject_id}.png",
                         title=f"{s.subject_id}: references, then per row setting / prompt / seeds {seeds}; "
                               "under each image its fidelity, * = identified as this subject (top-1 of 6)")
        for name in adapters.values():
            unload_subject_lora(pipe, name)
        print(f"{s.subject_id}: {len(rows)} images scored, {time.time() - t0:.0f}s", flush=True)
        # results so far after every subject: an interrupted run still leaves a well-formed report
        summary = write_results(out, rows, args, plan, subjects_done=subj.index(s) + 1, n_prompts=len(prompts),
                                seconds=time.time() - t0, train_seconds=train_seconds)
    return summary


def write_results(out: Path, rows: list[dict], args: argparse.Namespace, plan: list[Setting], *, subjects_done: int,
                  n_prompts: int, seconds: float, train_seconds: float) -> dict:
    scores = pl.DataFrame(rows)
    table = summarize(scores)
    scores.write_parquet(out / "toyworld_scores.parquet")
    table.write_csv(out / "toyworld_table.csv")
    pareto_plot(table, out / "toyworld_pareto.png")
    matched = {split: matched_fidelity(table, split) for split in ("all", "plain", "stylized")}
    summary = {
        "command": " ".join(["python", "benchmarks/toyworld_personalization.py", *sys.argv[1:]]),
        "model": str(args.model), "subjects": subjects_done, "subjects_planned": args.subjects, "prompts": n_prompts,
        "seeds": args.seeds, "settings": [st.label for st in plan], "images": scores.height, "guidance_scale": args.guidance_scale,
        "steps": args.steps, "lora": {"steps": args.lora_steps, "lr": args.lora_lr, "rank": args.lora_rank,
                                       "batch": args.lora_batch, "dco_beta": args.dco_beta},
        "seconds_total": seconds, "seconds_training": train_seconds,
        "matched_fidelity": matched, "default": choose_default(table),
        "figures": personalization_figures(table, scores),
    }
    (out / "toyworld_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "toyworld.md").write_text(report_markdown(table, summary, scores))
    return summary


def rebuild_report(out: Path) -> dict:
    scores = pl.read_parquet(out / "toyworld_scores.parquet")
    summary = json.loads((out / "toyworld_summary.json").read_text())
    table = summarize(scores)
    table.write_csv(out / "toyworld_table.csv")
    pareto_plot(table, out / "toyworld_pareto.png")
    summary["matched_fidelity"] = {split: matched_fidelity(table, split) for split in ("all", "plain", "stylized")}
    summary["default"] = choose_default(table)
    summary["figures"] = personalization_figures(table, scores)
    (out / "toyworld_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "toyworld.md").write_text(report_markdown(table, summary, scores))
    return summary


def report_markdown(table: pl.DataFrame, summary: dict, scores: pl.DataFrame | None = None) -> str:
    def verdict(split: str) -> str:
        m = [r for r in summary["matched_fidelity"][split] if not math.isnan(r["delta_alignment"])]
        if not m:
            return f"- {split}: no parallel-rescaled point falls inside the consistency curve's fidelity range; no matched comparison."
        d = np.array([r["delta_alignment"] for r in m])
        best = max(m, key=lambda r: r["delta_alignment"])
        ci = float(table.filter((pl.col("split") == split) & (pl.col("method") == "dco_par"))["alignment_ci"].mean())
        if abs(d.mean()) < ci:
            call = (f"the difference is smaller than the alignment CI half-width ({ci:.3f}): no significant difference "
                    "between parallel rescaling and consistency guidance at matched fidelity")
        else:
            call = f"parallel rescaling {'beats' if d.mean() > 0 else 'is worse than'} consistency guidance at matched fidelity"
        return (f"- {split}: over {len(m)} matched points, parallel-rescaled minus consistency alignment at equal fidelity = "
                f"mean {d.mean():+.3f} (min {d.min():+.3f}, max {d.max():+.3f}; best {best['setting']} "
                f"{best['delta_alignment']:+.3f}); {call}.")

    d = summary["default"]
    return "\n".join([
        "# Toy-world personalization benchmark",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Model: `{summary['model']}`; {summary['subjects']} subjects (of {summary['subjects_planned']} planned) x {summary['prompts']} prompts x {summary['seeds']} seeds "
        f"= {summary['subjects'] * summary['prompts'] * summary['seeds']} images per setting, {summary['images']} in all; "
        f"CFG {summary['guidance_scale']}, {summary['steps']} DDIM steps; LoRA {summary['lora']}. "
        f"Run time {summary['seconds_total']:.0f} s (LoRA training {summary['seconds_training']:.0f} s).",
        "",
        "Alignment = mean classifier probability of the prompt's background/scene and style; fidelity = mean identity-embedding "
        "cosine to the 4 references. ± = 95% CI half-width over (subject, prompt) cell means.",
        "",
        "## Identification and fidelity gap (plain prompts)",
        "",
        "Identified: the image's top-1 by mean identity cosine to the references is its own subject, among the six "
        "benchmark subjects (six shapes: the class noun alone names the shape), and among six looks on the subject's own "
        "shape (the subject and `subjects.look_alikes`: the other subjects' tones, split and mark on this shape; chance 1/6).",
        "",
        figures_markdown(personalization_figures(table, scores)),
        "",
        "## Matched-fidelity comparison (parallel-rescaled vs consistency guidance)",
        "",
        verdict("all"), verdict("plain"), verdict("stylized"),
        "",
        "Paired at the same consistency scale w (same subjects, prompts and seeds): parallel-rescaled with "
        "parallel_scale eta minus consistency guidance (eta = 1); ± = 95% CI over (subject, prompt) cells.",
        "",
        paired_markdown(scores) if scores is not None else "",
        "",
        f"Balanced choice (max of min-max-normalised alignment + fidelity over DCO guided settings): **{d['setting']}** "
        f"(alignment {d['alignment']:.3f}, fidelity {d['fidelity']:.3f}).",
        "",
        "## Table",
        "",
        table_markdown(table),
        "",
        "![pareto](toyworld_pareto.png)",
        "",
    ])


def base_quality(args: argparse.Namespace) -> dict:
    """Text-to-image quality of the base model on fresh world captions: classifier accuracy per
    attribute of pictures generated at ``--guidance-scale`` (DDIM, ``--steps``), against chance."""
    import torch
    from PIL import Image

    from prcore.method.models import load_pipeline
    from prcore.toyworld import world
    from prcore.toyworld.instruments import HEADS, ToyScorer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device="cpu", dtype="float32")
    scorer = ToyScorer()
    rng = np.random.default_rng(20261125)
    specs = [world.random_spec(rng, style_prob=0.5) for _ in range(args.base_prompts)]
    caps = [world.caption(s) for s in specs]
    images = []
    t0 = time.time()
    for i in range(0, len(caps), 50):
        g = [torch.Generator().manual_seed(1000 + j) for j in range(i, min(i + 50, len(caps)))]
        images += pipe(caps[i : i + 50], num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=g).images
    from prcore.toyworld.instruments import attribute_correct

    preds = scorer.classify(images)
    correct = [attribute_correct(p, sp) for p, sp in zip(preds, specs, strict=True)]

    def rate(key: str, keep=lambda sp: True) -> float:
        v = [c[key] for c, sp in zip(correct, specs, strict=True) if key in c and keep(sp)]
        return float(np.mean(v)) if v else float("nan")

    keys = ["shape", "color", "background", "style", "pattern", "split", "mark", "mark_color"]
    acc = {k: rate(k) for k in keys}
    photo = {k: rate(k, lambda sp: sp.style == "photo") for k in keys}
    solid = rate("background", lambda sp: not sp.background.startswith("scene:"))
    chance = {k: 1.0 / len(v) for k, v in HEADS.items()}
    # the instruments on rendered pictures of the same captions: the ceiling the generated pictures are read against
    rendered = scorer.classify([world.render(sp) for sp in specs])
    ceiling = {}
    for k in keys:
        v = [c[k] for c in (attribute_correct(p, sp) for p, sp in zip(rendered, specs, strict=True)) if k in c]
        ceiling[k] = float(np.mean(v))
    result = {"command": " ".join(["python", "benchmarks/toyworld_personalization.py", *sys.argv[1:]]),
              "prompts": len(caps), "guidance_scale": args.guidance_scale, "steps": args.steps, "accuracy": acc,
              "accuracy_photo": photo, "solid_background_followed": solid, "instruments_on_rendered": ceiling,
              "chance": chance, "seconds": time.time() - t0}
    (out / "toyworld_base_quality.json").write_text(json.dumps(result, indent=2))
    cols = 8
    rows = min(8, len(images) // cols)
    grid = Image.new("RGB", (cols * 34, rows * 34), "white")
    for k in range(rows * cols):
        grid.paste(images[k], ((k % cols) * 34, (k // cols) * 34))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out / "toyworld_base_samples.png")
    (out / "toyworld_base_samples.txt").write_text("\n".join(caps[: rows * cols]) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Toy-world personalization benchmark")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 2 subjects x 2 prompts x 2 seeds, short training")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work", default=None, help="LoRA folder cache (default OUT/work)")
    ap.add_argument("--model", default=str(model_path()))
    ap.add_argument("--subjects", type=int, default=len(subjects.SUBJECTS))
    ap.add_argument("--prompts-per-kind", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--consistency-scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--parallel-scales", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-batch", type=int, default=2)
    ap.add_argument("--dco-beta", type=float, default=1000.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-dreambooth", action="store_true", help="no DreamBooth-loss LoRA / db_cfg rows")
    ap.add_argument("--base-quality", action="store_true", help="only measure the base model's text-to-image accuracy")
    ap.add_argument("--base-prompts", type=int, default=200)
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild table, plot and report from OUT/toyworld_scores.parquet and OUT/toyworld_summary.json")
    ap.add_argument("--sheet-settings", nargs="*", default=["pretrained", "dco_cfg", "dco_cons@3", "dco_par0.5@3"])
    ap.add_argument("--sheets-only", action="store_true",
                    help="sample only the contact sheets' prompts and settings (same seeds and cached LoRAs: the same pictures)")
    ap.add_argument("--sheet-prompts", type=int, nargs="*", default=[0, 4, 6], help="prompt ids shown on the contact sheets")
    args = ap.parse_args(argv)
    if args.quick:
        args.subjects, args.prompts_per_kind, args.seeds, args.steps = 2, 1, 2, 8
        args.consistency_scales, args.parallel_scales = [1.0, 3.0], [0.0, 0.5]
        args.lora_steps = 20
        args.sheet_prompts = [0, len(PLAIN_PROMPTS)]
        if args.out == str(REPO / "benchmarks" / "results"):
            ap.error("--quick needs --out (keep the committed full results)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.base_quality:
        r = base_quality(args)
        print(json.dumps(r["accuracy"]))
        print("name=toyworld_base_quality")
        return
    if args.report_only:
        summary = rebuild_report(Path(args.out))
    else:
        summary = run(args)
    d = summary["default"]
    print(f"images={summary['images']} seconds={summary['seconds_total']:.0f} default={d['setting']}")
    print("name=toyworld_personalization")


if __name__ == "__main__":
    main()
