"""Contact sheets: a subject's reference images beside its generated images, one labelled row per
request (the prompt and the guidance settings), each image captioned with its scores when a scorer
ran and framed in red when it failed QC."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import contact_sheet_key

CONTACT_SHEET_MAX_IMAGES = 16


@dataclass(frozen=True)
class SheetRow:
    """One request's images on a contact sheet, under its label (prompt, then guidance settings)."""

    label: Sequence[str]
    images: Sequence[Image.Image]
    notes: Sequence[tuple[str, bool | None]] = ()


LINE = 12  # the default bitmap font's line height


def contact_sheet(references: Sequence[Image.Image], rows: Sequence[SheetRow], *, cell: int = 128,
                  columns: int = 4, gap: int = 6, label: str | None = None) -> Image.Image:
    """Reference images stacked in a left column; beside them one block per row: its label lines,
    then its images in a grid of ``columns``.

    Canvas: width = gap + cell + 3*gap + columns*(cell+gap); height = top + gap + max(references,
    sum over rows of (len(label)*LINE + ceil(len(images)/columns)*(cell+gap))). ``notes[k]`` =
    (text, qc_pass) is printed under image k (its scores); a QC failure gets a red frame.
    """
    widest = max((len(r.images) for r in rows), default=1)
    columns = max(1, min(columns, widest))
    top = 18 if label else 0
    blocks = [len(r.label) * LINE + max(1, math.ceil(len(r.images) / columns)) * (cell + gap) for r in rows]
    width = gap + cell + 3 * gap + columns * (cell + gap)
    height = top + gap + max(len(references) * (cell + gap), sum(blocks), cell + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if label:
        draw.text((gap, 3), label, fill=(0, 0, 0))
    for r, ref in enumerate(references):
        sheet.paste(_fit(ref, cell), (gap, top + gap + r * (cell + gap)))
    x_sep = gap + cell + gap
    draw.line([(x_sep, top), (x_sep, height)], fill=(160, 160, 160), width=2)
    x0 = x_sep + 2 * gap
    y = top + gap
    for row, block in zip(rows, blocks, strict=True):
        for i, line in enumerate(row.label):
            draw.text((x0, y + i * LINE), _fit_text(draw, line, width - x0 - gap), fill=(0, 0, 0) if i == 0 else (90, 90, 90))
        y_images = y + len(row.label) * LINE
        for k, img in enumerate(row.images):
            r, c = divmod(k, columns)
            x, yk = x0 + c * (cell + gap), y_images + r * (cell + gap)
            sheet.paste(_fit(img, cell), (x, yk))
            text, passed = row.notes[k] if k < len(row.notes) else ("", None)
            if text:
                draw.rectangle([(x, yk + cell - 12), (x + cell - 1, yk + cell - 1)], fill=(255, 255, 255))
                draw.text((x + 2, yk + cell - 12), _fit_text(draw, text, cell - 4), fill=(0, 0, 0))
            if passed is False:
                draw.rectangle([(x - 2, yk - 2), (x + cell + 1, yk + cell + 1)], outline=(220, 0, 0), width=3)
        y += block
    return sheet


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text``, or its longest prefix + "..." that fits ``width`` pixels: a bisection (a few
    measurements) rather than one measurement per character dropped, which took minutes for a
    20,000-character prompt."""
    if draw.textlength(text) <= width:
        return text
    lo, hi = 0, min(len(text), width)  # no glyph is narrower than one pixel
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..."


def request_label(record: ImageRecord) -> list[str]:
    """A row's label: the personal prompt, then the guidance settings that drew it."""
    scales = [f"cfg {record.guidance_scale:g}"]
    if record.guidance in ("consistency", "parallel_rescaled"):
        scales.append(f"cg {record.consistency_scale:g}")
    if record.guidance == "parallel_rescaled":
        scales.append(f"eta {record.parallel_scale:g}")
    if (record.consistency_start, record.consistency_stop) != (0.0, 1.0) and record.guidance in ("consistency", "parallel_rescaled"):
        scales.append(f"window {record.consistency_start:g}-{record.consistency_stop:g}")
    settings = f"{record.guidance}: {', '.join(scales)}; {record.num_inference_steps} steps {record.scheduler}"
    return [record.personal_prompt, settings]


def request_rows(records: Sequence[ImageRecord], images: Sequence[Image.Image]) -> list[SheetRow]:
    """One labelled row per request (records grouped by ``req_fp``, in order), scores as notes."""
    groups: dict[str, list[int]] = {}
    for k, record in enumerate(records):
        groups.setdefault(record.req_fp, []).append(k)
    return [SheetRow(request_label(records[ks[0]]), [images[k] for k in ks], [score_note(records[k]) for k in ks])
            for ks in groups.values()]


def score_note(record: ImageRecord) -> tuple[str, bool | None]:
    """A contact-sheet caption from a record's scores ("T.31 I.72 D.64 QC fail") and its QC verdict."""
    parts = [f"{tag}{getattr(record, m):.2f}".replace("0.", ".", 1) for tag, m in (("T", "clip_t"), ("I", "clip_i"), ("D", "dino"))
             if isinstance(getattr(record, m), (int, float))]
    passed = record.qc_pass
    if passed is False:
        parts.append("QC fail")
    return " ".join(parts), passed


def _fit(img: Image.Image, cell: int) -> Image.Image:
    img = img.convert("RGB")
    side = min(img.size)
    left, upper = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, upper, left + side, upper + side)).resize((cell, cell), Image.Resampling.LANCZOS)

def write_contact_sheet(store: Any, run_id: str, subject_id: str, references: Sequence[Image.Image],
                        records: Sequence[ImageRecord], *, max_images: int = CONTACT_SHEET_MAX_IMAGES,
                        cell: int = 128) -> str | None:
    """Write ``runs/{run_id}/contact_sheets/{subject_id}.png``: the references beside the first
    ``max_images`` of ``records`` (finished images: their records say so), each captioned with its scores."""
    shown = list(records)[:max_images]
    if not shown:
        return None
    images = [Image.open(io.BytesIO(store.get(r.key))).convert("RGB") for r in shown]
    sheet = contact_sheet(list(references)[:6], request_rows(shown, images), cell=cell,
                          label=f"{subject_id}: references | generated, one row per prompt")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    key = contact_sheet_key(run_id, subject_id)
    store.put(key, buf.getvalue(), content_type="image/png")
    return key
