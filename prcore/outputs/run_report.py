"""The browsable run report: ``runs/{run_id}/index.html``, one self-contained page.

Per subject (failed subjects first, then subjects with QC failures, then the rest): the reference
images, then its images grouped by prompt, each with prompt, guidance settings, seed, scores and
the QC verdict. Every picture is embedded as a small thumbnail (a ``data:`` URI), so the page
shows everything whether it is opened from a local folder, from S3 static hosting or through a
single presigned link; each thumbnail links to the full image by a relative path
(``../../images/...``), which works from a folder and from static hosting (a presigned page cannot
sign its links: the thumbnails still show). No script, no external resource.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import run_key

THUMB = 160
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-top:1px solid #ccc;padding-top:.8em}
h3{font-size:1em;margin:.8em 0 .3em}.bad{color:#b00020}.warn{color:#a15c00}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:THUMBpx;font-size:11px;line-height:1.3}
.cell img{width:INNERpx;height:INNERpx;object-fit:cover;display:block;border:3px solid #ddd}
.cell.qcfail img{border-color:#d32f2f}.refs img{border-color:#1976d2}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
""".replace("THUMB", str(THUMB)).replace("INNER", str(THUMB - 6))


def report_key(run_id: str) -> str:
    return run_key(run_id, "index.html")


def thumbnail_uri(data: bytes, size: int = THUMB) -> str:
    """A small JPEG of an image, as a data: URI."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_report(run_id: str, summary: dict[str, Any], subjects: Sequence[dict[str, Any]]) -> str:
    """The page. ``subjects``: dicts with ``subject_id``, ``result`` (SubjectResult), ``references``
    (data URIs), ``records`` (ImageRecord) and ``thumbs`` (key -> data URI); ``omitted``: listed without images."""
    def order(s: dict[str, Any]) -> tuple:
        r = s["result"]
        return (r.error is None, r.qc_failed == 0 and not any(x.qc_pass is False for x in s["records"]), s["subject_id"])

    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>prcore run {_e(run_id)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>Run {_e(run_id)}</h1>",
           "<table><tr>" + "".join(f"<th>{_e(k)}</th>" for k in ("subjects", "generated", "skipped", "failed_subjects",
                                                                    "qc_failed", "leased")) + "</tr><tr>"
           + "".join(f"<td>{_e(summary.get(k, ''))}</td>" for k in ("subjects", "generated", "skipped", "failed_subjects",
                                                                     "qc_failed", "leased")) + "</tr></table>"]
    for s in sorted(subjects, key=order):
        r = s["result"]
        sid = s["subject_id"]
        out.append(f"<h2 id='{_e(sid)}'>{_e(sid)}</h2>")
        if r.error:
            out.append(f"<p class='bad'>failed at {_e(r.step)}: {_e(r.error)}</p>")
        elif r.leased_by:
            out.append(f"<p class='warn'>worked on by run {_e(r.leased_by)} (leased)</p>")
        if s.get("omitted"):
            out.append(f"<p>{r.generated} generated this run; images not shown here (the page shows the first subjects' "
                       "images, failed ones first): see its contact sheet and the catalogue</p>")
            continue
        qc_bad = sum(1 for x in s["records"] if x.qc_pass is False)
        out.append(f"<p>{r.generated} generated this run, {len(s['records'])} image(s) in total"
                   + (f", <span class='bad'>{qc_bad} failed QC</span>" if qc_bad else "") + "</p>")
        if s["references"]:
            out.append("<h3>references</h3><div class='grid refs'>")
            out += [f"<div class='cell'><img alt='reference {i} of {_e(sid)}' src='{uri}'></div>" for i, uri in enumerate(s["references"])]
            out.append("</div>")
        by_prompt: dict[str, list[ImageRecord]] = {}
        for rec in s["records"]:
            by_prompt.setdefault(rec.prompt_id, []).append(rec)
        for pid, recs in sorted(by_prompt.items()):
            recs.sort(key=lambda x: (x.qc_pass is not False, x.req_fp, x.index))
            first = recs[0]
            out.append(f"<h3>{_e(pid)}: “{_e(first.personal_prompt)}”</h3>")
            out.append(f"<p>{_e(first.guidance)}, w_cfg {_e(first.guidance_scale)}, w_cg {_e(first.consistency_scale)}, "
                       f"eta {_e(first.parallel_scale)}, {_e(first.num_inference_steps)} steps, {_e(first.scheduler)}</p><div class='grid'>")
            for rec in recs:
                cls = "cell qcfail" if rec.qc_pass is False else "cell"
                href = "../../" + rec.key  # relative to runs/{run_id}/index.html
                thumb = s["thumbs"].get(rec.key, "")
                verdict = "QC fail" if rec.qc_pass is False else ("QC pass" if rec.qc_pass else "")
                out.append(f"<div class='{cls}'><a href='{_e(href)}'><img alt='{_e(rec.key)}' src='{thumb}'></a>"
                           f"seed {rec.seed} #{rec.index}<br>CLIP-T {_score(rec.clip_t)} CLIP-I {_score(rec.clip_i)} "
                           f"DINO {_score(rec.dino)} {verdict}</div>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_run_report(store: Any, run_id: str, summary: dict[str, Any], subjects: Iterable[dict[str, Any]]) -> str:
    """Render and put ``runs/{run_id}/index.html``; returns its key."""
    key = report_key(run_id)
    store.put(key, render_report(run_id, summary, list(subjects)).encode(), content_type="text/html; charset=utf-8")
    return key
