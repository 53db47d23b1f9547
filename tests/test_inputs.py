"""Inputs refused before any work, and reference images decoded as a viewer shows them.

Every image here is written by the test with Pillow/numpy, with pixels known in advance.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from prcore.data.images import decode_image
from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.schema import ManifestInvalid
from prcore.data.validate import validate

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def gray16(value: int) -> bytes:
    """A 16-bit grayscale PNG (Pillow opens it as mode I;16) of one value."""
    img = Image.fromarray(np.full((48, 48), value, np.uint16))
    assert img.mode == "I;16"
    return png(img)


def palette(index: int, transparent: int | None = None) -> bytes:
    img = Image.new("P", (40, 40), index)
    img.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9))
    return png(img, **({"transparency": transparent} if transparent is not None else {}))


def exif_rotated() -> bytes:
    """Stored 80x40, left half red and right half blue, EXIF orientation 6 ("rotate 90 clockwise to
    display"): a viewer shows it 40x80, red on top."""
    img = Image.new("RGB", (80, 40), BLUE)
    img.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif.tobytes())


# (file bytes, the pixel a viewer shows at the centre, the size a viewer shows, tolerance)
CASES = {
    "16-bit gray PNG": (gray16(204 * 257), (204, 204, 204), (48, 48), 0),
    "16-bit dark gray PNG": (gray16(51 * 257), (51, 51, 51), (48, 48), 0),
    "palette PNG": (palette(1), GREEN, (40, 40), 0),
    "palette PNG, transparent index": (palette(0, transparent=0), WHITE, (40, 40), 0),
    "gray+alpha PNG (half transparent)": (png(Image.new("LA", (40, 40), (100, 128))), (177, 177, 177), (40, 40), 1),
    "RGBA PNG, fully transparent": (png(Image.new("RGBA", (40, 40), (0, 0, 255, 0))), WHITE, (40, 40), 0),
    "CMYK JPEG": (jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0))), RED, (40, 40), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_images_decode_to_the_picture_a_viewer_shows(name):
    data, pixel, size, tol = CASES[name]
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == size
    got = img.getpixel((size[0] // 2, size[1] // 2))
    assert all(abs(a - b) <= tol for a, b in zip(got, pixel, strict=True)), (name, got, pixel)


def test_exif_rotation_is_applied():
    img = decode_image(exif_rotated())
    assert img.size == (40, 80)
    top, bottom = img.getpixel((20, 10)), img.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 50, top  # red on top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_sixteen_bit_tiff_and_32_bit_gray_scale_like_a_viewer():
    a = np.full((40, 40), 128 * 257, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "TIFF")
    assert decode_image(buf.getvalue()).getpixel((5, 5)) == (128, 128, 128)
    wide = Image.fromarray(np.full((40, 40), 64 * 257, np.int32), mode="I")  # 32-bit holding 16-bit values
    assert decode_image(wide).getpixel((5, 5)) == (64, 64, 64)


def test_references_for_scoring_are_decoded_like_the_training_images(tmp_path):
    """What the contact sheet and CLIP-I/DINO see is the picture trained on, not a white 16-bit image."""
    from prcore.data.plan import SubjectJob
    from prcore.pipeline.subject import SubjectInputs
    from prcore.quality.scorer import to_pil

    data = gray16(204 * 257)
    job = SubjectJob(subject_id="s", class_noun="dog", identifier="sks", instance_images=["refs/0.png"], instance_prompts=None,
                     train_overrides={}, base_model=None, subject_fp="0" * 16, n_requests=0, n_images=0, n_done=0)
    refs = SubjectInputs(job, [data]).references
    assert refs[0].getpixel((3, 3)) == (204, 204, 204)
    assert to_pil(data).getpixel((3, 3)) == (204, 204, 204)
    assert to_pil(exif_rotated()).size == (40, 80)


# -- manifests --------------------------------------------------------------------------------------


@pytest.fixture
def refs(tmp_path) -> list[str]:
    folder = tmp_path / "refs"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for i in range(2):
        Image.fromarray(noise).save(folder / f"{i}.png")
    return [f"refs/{i}.png" for i in range(2)]


def rows(images: list[str], **cols) -> list[dict]:
    out = [{"subject_id": "dog1", "instance_images": images, "class_noun": "dog", "prompt": "a {subject} on the beach", **cols},
           {"subject_id": "dog1", "instance_images": images, "class_noun": "dog", "prompt": "a {subject} in snow", **cols}]
    return out


def write(folder: Path, data: list[dict], name: str = "m.parquet") -> Path:
    path = folder / name
    pl.DataFrame(data).write_parquet(path)
    return path


def errors_of(errors, column: str) -> list[str]:
    return [str(e) for e in errors if e.column == column]


def cli():
    from prcore.cli import build_app

    app = build_app("manifest", "run")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(map(str, args)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_cut_in_half_is_refused_by_validate_and_by_the_run_check(tmp_path, refs, fmt):
    noise = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    whole = (jpeg if fmt == "JPEG" else png)(Image.fromarray(noise))
    name = f"half.{fmt.lower()}"
    (tmp_path / "refs" / name).write_bytes(whole[: len(whole) // 2])
    manifest = write(tmp_path, rows([refs[0], f"refs/{name}"]))

    errors = errors_of(validate(load_manifest(manifest)), "instance_images")
    assert len(errors) == 1 and errors[0].startswith("row 0 (subject dog1), column instance_images:"), errors
    assert name in errors[0] and "truncated" in errors[0]

    from prcore.pipeline.subject import check_pending_images

    with pytest.raises(ManifestInvalid, match=rf"row 0 \(subject dog1\), column instance_images: .*{name}.*truncated"):
        check_pending_images(plan(load_manifest(manifest), check=False), str(manifest))

    res = cli()("manifest", "validate", manifest)
    assert res.exit_code == 2 and name in res.stderr and "truncated" in res.stderr, res.output


def finishes(fn, seconds: float = 20.0):
    """Run ``fn`` in a daemon thread; its result or exception, or a failure when it has not finished
    within ``seconds`` (a blocked read must not hang the test run)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    return out, time.monotonic() - started


def test_a_fifo_as_the_manifest_is_refused_at_once(tmp_path, refs):
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    out, took = finishes(lambda: load_manifest(fifo))
    assert isinstance(out.get("error"), ValueError) and "not a regular file" in str(out["error"]), out

    folder = tmp_path / "many"  # a FIFO among the files of a folder or glob: the same
    folder.mkdir()
    write(folder, rows(refs), "a.parquet")
    os.mkfifo(folder / "b.parquet")
    for uri in (folder, f"{folder}/*.parquet"):
        out, _ = finishes(lambda u=uri: load_manifest(u))
        assert "b.parquet" in str(out.get("error")) and "not a regular file" in str(out["error"]), out

    out, took = finishes(lambda: cli()("manifest", "validate", fifo))
    res = out["value"]
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "not a regular file" in res.stderr, res.output
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("identifier,noun", [("dog", "dog"), ("Dog", "dog"), ("retriever", "golden retriever"),
                                             ("", "dog"), ("{sks}", "dog"), ("s ks", "dog")])
def test_identifier_rules_are_checked_by_validate(tmp_path, refs, identifier, noun):
    data = [dict(r, class_noun=noun, identifier=identifier) for r in rows(refs)]
    errors = errors_of(validate(pl.DataFrame(data), check_images=False), "identifier")
    assert len(errors) == 1 and errors[0].startswith("row 0 (subject dog1), column identifier:"), errors
    assert repr(identifier) in errors[0]
    from prcore.data.schema import TrainingInputError
    from prcore.method.dco import check_subject

    with pytest.raises(TrainingInputError, match="identifier"):  # training applies the same rule
        check_subject(noun, identifier)


def test_identifier_rules_exit_2_from_prcore_manifest_validate(tmp_path, refs):
    ok = [dict(r, identifier="sks") for r in rows(refs)]
    assert validate(pl.DataFrame(ok), check_images=False) == []
    res = cli()("manifest", "validate", write(tmp_path, [dict(r, identifier="DOG") for r in rows(refs)]), "--no-check-images")
    assert res.exit_code == 2 and "column identifier: 'DOG' collides with the class noun 'dog'" in res.stderr, res.output


def test_unknown_target_module_names_are_refused_before_training(tmp_path, refs, tiny_sd_path):
    from prcore.method.targets import lora_layer_names
    from prcore.pipeline.subject import plan_jobs
    from prcore.store.storage import LocalStore

    layers = lora_layer_names(tiny_sd_path)
    assert layers and any(n.endswith(".to_q") for n in layers)
    bad = write(tmp_path, rows(refs, train_target_modules=["to_q", "bogus"]))
    good = write(tmp_path, rows(refs, train_target_modules=["to_q", "to_out.0", "ff.net.0.proj", "attn1.to_v"]), "good.parquet")

    def names(base):
        return lora_layer_names(base or tiny_sd_path)

    errors = errors_of(validate(load_manifest(bad), check_images=False, module_names=names), "train_target_modules")
    assert len(errors) == 1 and errors[0].startswith("row 0 (subject dog1), column train_target_modules: 'bogus' match"), errors
    assert "to_q" not in errors[0].split(";")[0] and "to_out.0" in errors[0] and "conv1" in errors[0]
    assert validate(load_manifest(good), check_images=False, module_names=names) == []

    # the run's planning step (prcore run's preflight and the flow's plan task)
    with pytest.raises(ManifestInvalid, match="column train_target_modules: 'bogus'"):
        plan_jobs(str(bad), LocalStore(tmp_path / "out"), model_id=str(tiny_sd_path), defaults=None)

    run = cli()
    res = run("manifest", "validate", bad, "--no-check-images", "--model", tiny_sd_path)
    assert res.exit_code == 2 and "column train_target_modules: 'bogus'" in res.stderr, res.output
    assert run("manifest", "validate", good, "--no-check-images", "--model", tiny_sd_path).exit_code == 0

    out = tmp_path / "out"
    started = time.monotonic()
    res = run("run", bad, "--output", out, "--model", tiny_sd_path, "--no-check-images")
    assert res.exit_code == 2 and "train_target_modules: 'bogus'" in res.stderr, res.output
    assert time.monotonic() - started < 30
    assert not out.exists() or not any(out.rglob("*.safetensors"))  # refused before any training


def test_the_runs_own_target_modules_setting_is_checked_before_training(tmp_path, refs, tiny_sd_path):
    """settings.train.target_modules (the flow's settings: what every subject without its own column trains)
    by the same rule as the manifest column, in the planning step that prcore run and the flow's plan task run."""
    from prcore.data.schema import GenerationDefaults
    from prcore.pipeline.subject import plan_jobs
    from prcore.store.storage import LocalStore

    manifest = str(write(tmp_path, rows(refs)))
    store = LocalStore(tmp_path / "out")
    with pytest.raises(ManifestInvalid, match=r"settings.train.target_modules: 'bogus' match\(es\) no layer of the UNet of the run's base model"):
        plan_jobs(manifest, store, model_id=str(tiny_sd_path), defaults=GenerationDefaults(), target_modules=("to_q", "bogus"))
    jobs = plan_jobs(manifest, store, model_id=str(tiny_sd_path), defaults=GenerationDefaults(), target_modules=("to_q", "ff.net.2"))
    assert [j.subject_id for j in jobs] == ["dog1"]
