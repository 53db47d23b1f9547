"""Test helper: an ImageRecord for image ``index`` of a planned request, as the flow would fill it."""

from __future__ import annotations

from typing import Any

from prcore.outputs.sidecar import ImageRecord


def record_for(request, index: int, **fields: Any) -> ImageRecord:
    p = request.params
    values: dict[str, Any] = dict(
        subject_id=request.subject_id, prompt_id=request.prompt_id, req_fp=request.req_fp, index=index,
        key=request.keys[index], seed=request.seeds[index], prompt_template=request.prompt,
        personal_prompt=request.prompt.replace("{subject}", "sks dog"), base_prompt=request.prompt.replace("{subject}", "dog"),
        negative_prompt=p["negative_prompt"], class_noun="dog", identifier="sks", guidance=p["guidance"],
        guidance_scale=p["guidance_scale"], consistency_scale=p["consistency_scale"], parallel_scale=p["parallel_scale"],
        num_inference_steps=p["num_inference_steps"], scheduler=p["scheduler"] or "DDIMScheduler", height=8, width=8,
        base_model="tiny", lora_fp=None, device="cpu", dtype="float32",
    )
    values.update(fields)
    return ImageRecord(**values)
