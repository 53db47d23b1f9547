"""Contact sheets: a subject's reference images beside a grid of its generated images, each captioned
with its scores and framed in red when it failed QC."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import contact_sheet_key

CONTACT_SHEET_MAX_IMAGES = 16


def contact_sheet(references: Sequence[Image.Image], images: Sequence[Image.Image], *, cell: int = 128,
                  columns: int = 4, gap: int = 6, label: str | None = None,
                  notes: Sequence[tuple[str, bool | None]] | None = None) -> Image.Image:
    """Reference images stacked in a left column, the new images in a grid of ``columns`` beside it.

    Canvas: width = cell + gap + columns*cell + (columns+1)*gap, height = max(len(refs),
    ceil(len(images)/columns)) rows of ``cell``; a thin separator marks references vs generated.
    ``notes[k]`` = (text, qc_pass) is printed under image k (its scores); a QC failure gets a red frame.
    """
    columns = max(1, min(columns, max(1, len(images))))
    grid_rows = max(1, math.ceil(len(images) / columns))
    rows = max(len(references), grid_rows, 1)
    top = 18 if label else 0
    width = gap + cell + 3 * gap + columns * (cell + gap)
    height = top + gap + rows * (cell + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if label:
        draw.text((gap, 3), label, fill=(0, 0, 0))
    for r, ref in enumerate(references):
        sheet.paste(_fit(ref, cell), (gap, top + gap + r * (cell + gap)))
    x_sep = gap + cell + gap
    draw.line([(x_sep, top), (x_sep, height)], fill=(160, 160, 160), width=2)
    x0 = x_sep + 2 * gap
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        x, y = x0 + c * (cell + gap), top + gap + r * (cell + gap)
        sheet.paste(_fit(img, cell), (x, y))
        text, passed = notes[k] if notes and k < len(notes) else ("", None)
        if text:
            draw.rectangle([(x, y + cell - 12), (x + cell - 1, y + cell - 1)], fill=(255, 255, 255))
            draw.text((x + 2, y + cell - 12), text, fill=(0, 0, 0))
        if passed is False:
            draw.rectangle([(x - 2, y - 2), (x + cell + 1, y + cell + 1)], outline=(220, 0, 0), width=3)
    return sheet


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
    sheet = contact_sheet(list(references)[:6], images, cell=cell, label=f"{subject_id}: references | generated",
                          notes=[score_note(r) for r in shown])
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    key = contact_sheet_key(run_id, subject_id)
    store.put(key, buf.getvalue(), content_type="image/png")
    return key
