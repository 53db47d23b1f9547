"""Scorer (CLIP-T, CLIP-I, DINO) on tiny CLIP/ViT models loaded through the product's path; QC; `prcore eval`."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from prcore.quality.evaluate import evaluate_outputs
from prcore.quality.qc import (
    METRICS,
    ImageScorerProtocol,
    QCConfigError,
    QCThresholds,
    failed_metrics,
    qc_pass,
    score_and_qc,
)
from prcore.quality.scorer import MetricModelError, RefEmbeddings, Scorer
from prcore.quality.tiny import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("metric-models") / "clip")


@pytest.fixture(scope="session")
def tiny_dino_path(tmp_path_factory):
    return build_tiny_dino(tmp_path_factory.mktemp("metric-models") / "dino")


@pytest.fixture(scope="session")
def scorer(tiny_clip_path, tiny_dino_path):
    return Scorer(clip_model=tiny_clip_path, dino_model=tiny_dino_path, device="cpu", batch_size=3)


def images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    """Distinct structured images: a colored rectangle on a noisy background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        arr[y : y + size[0] // 2, x : x + size[1] // 2] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(arr))
    return out


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


# ---------------------------------------------------------------------------------- Scorer


def test_identical_images_score_one_against_themselves(scorer):
    ims = images(3)
    for im in ims:
        (s,) = scorer.score([im], "a dog on the beach", [im])
        assert s["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert s["dino"] == pytest.approx(1.0, abs=1e-5)
    # against several copies of itself, the mean is still 1
    (s,) = scorer.score([ims[0]], None, [ims[0], ims[0].copy()])
    assert s["clip_i"] == pytest.approx(1.0, abs=1e-5) and s["dino"] == pytest.approx(1.0, abs=1e-5)
    # and a different image is not 1
    (s,) = scorer.score([ims[1]], None, [ims[0]])
    assert s["clip_i"] < 1 - 1e-4 and s["dino"] < 1 - 1e-4


def test_scores_follow_the_formulas(scorer, tiny_clip_path, tiny_dino_path):
    """CLIP-T = cos(text, image); CLIP-I/DINO = mean cosine to the references, recomputed here
    with the transformers models directly (CLS token for DINO)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    gen, refs = images(2, seed=1), images(3, seed=2)
    prompt = "a red dog in the snow"
    got = scorer.score(gen, prompt, refs)

    clip = CLIPModel.from_pretrained(tiny_clip_path, use_safetensors=True).eval()
    tok, proc = AutoTokenizer.from_pretrained(tiny_clip_path), AutoImageProcessor.from_pretrained(tiny_clip_path)
    dino = AutoModel.from_pretrained(tiny_dino_path, use_safetensors=True).eval()
    dproc = AutoImageProcessor.from_pretrained(tiny_dino_path)
    with torch.no_grad():
        def img_feat(ims):
            out = clip.get_image_features(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        t = clip.get_text_features(**tok([prompt], return_tensors="pt"))
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        gi, ri = img_feat(gen), img_feat(refs)
        gd = dino(pixel_values=dproc(images=gen, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
        rd = dino(pixel_values=dproc(images=refs, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    for k in range(2):
        assert got[k]["clip_t"] == pytest.approx(cos(gi[k], t[0]), abs=1e-5)
        assert got[k]["clip_i"] == pytest.approx(np.mean([cos(gi[k], ri[j]) for j in range(3)]), abs=1e-5)
        assert got[k]["dino"] == pytest.approx(np.mean([cos(gd[k], rd[j]) for j in range(3)]), abs=1e-5)
    assert list(got[0]) == list(METRICS)


def test_unconfigured_metrics_are_absent(tiny_clip_path, tiny_dino_path):
    clip_only = Scorer(clip_model=tiny_clip_path, device="cpu")
    dino_only = Scorer(dino_model=tiny_dino_path, device="cpu")
    none = Scorer(device="cpu")
    ims, refs = images(2), images(2, seed=5)
    assert clip_only.metrics == ("clip_t", "clip_i") and clip_only.enabled
    assert dino_only.metrics == ("dino",)
    assert none.metrics == () and not none.enabled
    assert all(set(s) == {"clip_t", "clip_i"} for s in clip_only.score(ims, "a dog", refs))
    assert all(set(s) == {"dino"} for s in dino_only.score(ims, "a dog", refs))
    assert none.score(ims, "a dog", refs) == [{}, {}]
    # no prompt: no CLIP-T; no references: no CLIP-I/DINO
    assert set(clip_only.score(ims, None, refs)[0]) == {"clip_i"}
    assert set(clip_only.score(ims, "a dog", None)[0]) == {"clip_t"}
    assert isinstance(clip_only, ImageScorerProtocol)


def test_models_are_cached_per_process(tiny_clip_path, tiny_dino_path, scorer):
    again = Scorer(clip_model=tiny_clip_path, dino_model=tiny_dino_path, device="cpu")
    assert again._clip.model is scorer._clip.model and again._dino.model is scorer._dino.model


def test_batching_matches_one_by_one(scorer, tiny_clip_path, tiny_dino_path):
    ims, refs = images(7, seed=3), images(2, seed=4)
    prompts = [f"a {c} dog" for c in ("red", "blue", "green", "red", "white", "black", "red")]
    batched = scorer.score(ims, prompts, refs)  # batch_size=3: batches of 3, 3, 1
    big = Scorer(clip_model=tiny_clip_path, dino_model=tiny_dino_path, device="cpu", batch_size=64)
    single = [big.score([im], p, refs)[0] for im, p in zip(ims, prompts, strict=True)]
    for b, s in zip(batched, single, strict=True):
        assert b.keys() == s.keys()
        for m in b:
            assert b[m] == pytest.approx(s[m], abs=1e-5)


def test_reference_embeddings_computed_once_per_subject(scorer, monkeypatch):
    refs = images(3, seed=8)
    embedded = scorer.embed_references(refs)
    assert isinstance(embedded, RefEmbeddings) and embedded.count == 3
    calls = []
    original = Scorer.dino_embeddings
    monkeypatch.setattr(Scorer, "dino_embeddings", lambda self, ims: calls.append(len(ims)) or original(self, ims))
    scorer.score(images(2, seed=9), "a dog", [r.copy() for r in refs])  # same pixels: cache hit
    assert calls == [2]  # only the generated images were embedded
    # per process: another Scorer on the same models finds them too
    again = Scorer(clip_model=scorer.clip_model, dino_model=scorer.dino_model, device="cpu")
    assert again.embed_references([r.copy() for r in refs]) is embedded
    via_object = scorer.score(images(2, seed=9), "a dog", embedded)
    via_images = scorer.score(images(2, seed=9), "a dog", refs)
    assert via_object == via_images


def test_inputs_as_arrays_and_png_bytes(scorer):
    im = images(1, seed=11)[0]
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    a = scorer.score([im], "a dog", [im])[0]
    b = scorer.score([np.asarray(im)], "a dog", [buf.getvalue()])[0]
    c = scorer.score([np.asarray(im).astype(np.float32) / 255.0], "a dog", [im])[0]
    for m in METRICS:
        assert a[m] == pytest.approx(b[m], abs=1e-6) and a[m] == pytest.approx(c[m], abs=1e-5)


def test_bad_inputs_give_clear_errors(scorer, tmp_path):
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        scorer.score(images(3), ["a", "b"], None)
    with pytest.raises(ValueError, match="no reference images"):
        scorer.score(images(1), "a dog", [])
    with pytest.raises(TypeError, match="cannot score an image"):
        scorer.score([42], "a dog", None)
    with pytest.raises(MetricModelError, match="no config.json"):
        Scorer(clip_model=tmp_path, device="cpu")
    with pytest.raises(MetricModelError, match="cannot load the DINO model"):
        Scorer(dino_model="no-such-org/no-such-model-prcore", device="cpu")
    other = Scorer(dino_model=scorer.dino_model, device="cpu")
    with pytest.raises(ValueError, match="embed them with this scorer"):
        other.score(images(1), None, scorer.embed_references(images(1)))


def test_bin_only_weights_are_refused(tiny_dino_path, tmp_path):
    """Weights load from safetensors only: a folder holding only pytorch_model.bin is refused."""
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    folder.mkdir()
    torch.save(load_file(tiny_dino_path / "model.safetensors"), folder / "pytorch_model.bin")
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((tiny_dino_path / name).read_bytes())
    with pytest.raises(MetricModelError, match="no file named model.safetensors"):
        Scorer(dino_model=folder, device="cpu")


# ---------------------------------------------------------------------------------- QC


def test_qc_flags_exactly_the_images_below_thresholds(scorer):
    ims, refs = images(6, seed=21), images(2, seed=22)
    scores = scorer.score(ims, "a dog on the beach", refs)
    dino = sorted(s["dino"] for s in scores)
    clip_t = sorted(s["clip_t"] for s in scores)
    t = QCThresholds(dino=(dino[1] + dino[2]) / 2, clip_t=(clip_t[0] + clip_t[1]) / 2)
    expected = [s["dino"] >= t.dino and s["clip_t"] >= t.clip_t for s in scores]
    got = [qc_pass(s, t) for s in scores]
    assert got == expected and 2 <= got.count(False) <= 3
    records = score_and_qc(scorer, ims, prompt="a dog on the beach", references=refs, thresholds=t)
    assert [r["qc_pass"] for r in records] == expected
    assert all({"clip_t", "clip_i", "dino", "qc_pass", "qc_thresholds"} == set(r) for r in records)
    assert records[0]["qc_thresholds"] == {"clip_t": t.clip_t, "dino": t.dino}
    # equality passes; no thresholds: qc_pass None
    assert qc_pass({"dino": 0.5}, QCThresholds(dino=0.5))
    assert failed_metrics({"dino": 0.4, "clip_t": 0.2}, QCThresholds(dino=0.5, clip_t=0.1)) == ["dino"]
    assert not qc_pass({"dino": float("nan")}, QCThresholds(dino=0.0))
    assert score_and_qc(scorer, ims[:1], prompt="a dog", references=refs)[0]["qc_pass"] is None


def test_qc_threshold_for_unscored_metric_is_an_error(tiny_clip_path):
    with pytest.raises(QCConfigError, match="dino"):
        qc_pass({"clip_t": 0.3, "clip_i": 0.8}, QCThresholds(dino=0.5))
    clip_only = Scorer(clip_model=tiny_clip_path, device="cpu")
    with pytest.raises(QCConfigError, match="--dino-model"):
        score_and_qc(clip_only, images(1), prompt="a dog", references=None, thresholds=QCThresholds(dino=0.5))
    with pytest.raises(QCConfigError, match="outside"):
        QCThresholds(clip_t=1.5)
    with pytest.raises(QCConfigError, match="finite"):
        QCThresholds(dino=float("nan"))


def test_qc_thresholds_from_manifest_columns():
    defaults = QCThresholds(clip_t=0.2, dino=0.4)
    t = QCThresholds.from_columns({"qc_dino": 0.6, "qc_clip_i": None, "subject_id": "x"}, defaults)
    assert t == QCThresholds(clip_t=0.2, clip_i=None, dino=0.6)
    assert QCThresholds.from_columns({"qc_clip_t": float("nan")}) == QCThresholds()
    assert not QCThresholds() and QCThresholds(clip_i=0.1).configured() == {"clip_i": 0.1}


# ---------------------------------------------------------------------------------- prcore eval


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_output_root(store, refs_dir, *, with_instance_images: bool = True) -> dict[str, Image.Image]:
    """Two subjects x two prompts x two images, written as the runner writes them
    (prcore.outputs.sidecar.write_image: PNG, then the sidecar with the run's record), plus one orphan PNG
    without its sidecar (not committed, must not be scored)."""
    from prcore_testing import record_for

    from prcore.data.plan import ImageRequest
    from prcore.data.schema import GenerationDefaults
    from prcore.outputs.sidecar import write_image
    from prcore.store.keys import image_key

    written = {}
    for s, (subject, noun) in enumerate((("dog1", "dog"), ("cat2", "cat"))):
        ref_folder = refs_dir / subject
        ref_folder.mkdir(parents=True)
        ref_uris = []
        for j, ref in enumerate(images(2, seed=100 + s)):
            ref.save(ref_folder / f"{j}.png")
            ref_uris.append(str(ref_folder / f"{j}.png"))
        for p, (prompt_id, template) in enumerate((("p0", "a {subject} on the beach"), ("p1", "a {subject} in the snow"))):
            fp = f"{s}{p}" * 8
            d = GenerationDefaults()
            params = {k: getattr(d, k) for k in ("guidance", "guidance_scale", "consistency_scale", "parallel_scale",
                                                  "num_inference_steps", "negative_prompt", "scheduler")}
            request = ImageRequest(subject, prompt_id, template, params, fp, seeds=[1, 2], done=[False, False],
                                   keys=[image_key(subject, prompt_id, fp, i) for i in range(2)])
            for i, im in enumerate(images(2, seed=200 + 10 * s + p)):
                extra = {"qc_dino": 0.0} if subject == "cat2" else {}
                if with_instance_images:
                    extra["instance_images"] = ref_uris
                record = record_for(request, i, run_id="run-a" if subject == "dog1" else "run-b", class_noun=noun,
                                    base_prompt=template.format(subject=noun), personal_prompt=template.format(subject=f"sks {noun}"),
                                    width=im.width, height=im.height, extra=extra)
                write_image(store, record, im)
                written[request.keys[i]] = im
    store.put("images/dog1/p0/" + "f" * 16 + "/0.png", _png(images(1, seed=999)[0]))  # orphan
    return written


def test_evaluate_outputs_updates_sidecars_and_writes_scores(scorer, tmp_path):
    from prcore.store.storage import open_store

    root = tmp_path / "out"
    store = open_store(root)
    written = write_output_root(store, tmp_path / "refs")
    result = evaluate_outputs(store, scorer, thresholds=QCThresholds(clip_t=-1.0))
    assert len(result.rows) == 8 and {r["key"] for r in result.rows} == set(written)  # not the orphan
    table = pl.read_parquet(root / result.scores_key)
    assert result.scores_key.startswith("runs/eval-") and table.height == 8
    for row in table.iter_rows(named=True):
        sidecar = json.loads((root / row["key"].replace(".png", ".json")).read_text())
        assert sidecar["clip_t"] == pytest.approx(row["clip_t"]) and sidecar["dino"] == pytest.approx(row["dino"])
        assert sidecar["qc_pass"] is True and sidecar["subject_id"] == row["subject_id"]  # old fields kept
        # the numbers are the scorer's for that image, its base prompt and its subject's references
        refs = [Image.open(u) for u in sidecar["instance_images"]]
        expect = scorer.score([written[row["key"]]], sidecar["base_prompt"], refs)[0]
        assert row["clip_i"] == pytest.approx(expect["clip_i"], abs=1e-6)
        assert row["clip_t"] == pytest.approx(expect["clip_t"], abs=1e-6)
        # cat2 recorded qc_dino=0 with its parameters: both thresholds apply there
        assert sidecar["qc_thresholds"] == ({"clip_t": -1.0, "dino": 0.0} if row["subject_id"] == "cat2" else {"clip_t": -1.0})
    # the subjects' catalogue rows are stale now: marked, so the next run rewrites their catalogue files
    assert sorted(p.name for p in (root / "state" / "dirty").iterdir()) == ["cat2.json", "dog1.json"]
    # only one run; its table goes to runs/{run_id}/
    only = evaluate_outputs(store, scorer, run_id="run-b")
    assert {r["subject_id"] for r in only.rows} == {"cat2"} and only.scores_key == "runs/run-b/scores.parquet"
    with pytest.raises(ValueError, match="run_id 'nope'"):
        evaluate_outputs(store, scorer, run_id="nope")


def test_evaluate_outputs_on_s3(scorer, tmp_path, s3_bucket):
    from prcore.store.storage import open_store

    store = open_store(f"s3://{s3_bucket}/root")
    write_output_root(store, tmp_path / "refs")
    result = evaluate_outputs(store, scorer)
    assert len(result.rows) == 8
    table = pl.read_parquet(io.BytesIO(store.get(result.scores_key)))
    assert table.height == 8 and table["dino"].is_not_null().all()
    key = result.rows[0]["key"].replace(".png", ".json")
    assert json.loads(store.get(key))["dino"] == pytest.approx(result.rows[0]["dino"])


def test_prcore_eval_cli(tiny_clip_path, tiny_dino_path, tmp_path):
    from prcore.cli import build_app

    app = build_app("evaluate")
    from prcore.store.storage import open_store

    root = tmp_path / "out"
    write_output_root(open_store(root), tmp_path / "refs", with_instance_images=False)
    runner = CliRunner()
    before = {p: p.read_bytes() for p in root.glob("images/*/*/*/*.json")}
    # cat2's run recorded qc_dino: scoring it without DINO is an error, found before anything is written
    res = runner.invoke(app, ["eval", str(root), "--clip-model", str(tiny_clip_path), "--device", "cpu"])
    assert res.exit_code == 2 and "images/cat2/" in res.output and "'dino': 0.0" in res.output and "--dino-model" in res.output
    assert {p: p.read_bytes() for p in root.glob("images/*/*/*/*.json")} == before
    # sidecars without instance_images: CLIP-T only, and the output says why
    res = runner.invoke(app, ["eval", str(root), "--run", "run-a", "--clip-model", str(tiny_clip_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "no reference images known" in res.output
    scored = [json.loads(p.read_text()) for p in root.glob("images/dog1/*/*/*.json")]
    assert len(scored) == 4 and all(s["clip_t"] is not None and s["clip_i"] is None for s in scored)
    # references from a folder with one sub-folder per subject
    res = runner.invoke(app, ["eval", str(root), "--clip-model", str(tiny_clip_path), "--dino-model", str(tiny_dino_path),
                              "--device", "cpu", "--qc-dino", "1.0", "--references", str(tmp_path / "refs")])
    assert res.exit_code == 0, res.output
    assert "dog1" in res.output and "cat2" in res.output and "scores in" in res.output
    sidecars = [json.loads(p.read_text()) for p in root.glob("images/*/*/*/*.json")]
    assert len(sidecars) == 8 and all(s["qc_pass"] is False for s in sidecars)  # nothing reaches DINO 1.0
    assert all(-1 <= s["dino"] < 1 and -1 <= s["clip_i"] < 1 for s in sidecars)
    # user errors: one line, exit 2
    res = runner.invoke(app, ["eval", str(root)])
    assert res.exit_code == 2 and "--clip-model" in res.output
    res = runner.invoke(app, ["eval", str(root), "--clip-model", str(tiny_clip_path), "--qc-dino", "0.5"])
    assert res.exit_code == 2 and "not scored" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", str(root), "--dino-model", str(tmp_path / "missing-model")])
    assert res.exit_code == 2 and "cannot load the DINO model" in res.output


def test_reference_uris_from_manifest_and_folder(tmp_path):
    from prcore.quality.evaluate import reference_uris_from_folder, reference_uris_from_manifest

    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        images(1)[0].save(tmp_path / "imgs" / name)
    pl.DataFrame({
        "subject_id": ["s1", "s1"], "instance_images": [["imgs/a.png", "imgs/b.png"]] * 2, "class_noun": ["dog", "dog"],
        "prompt": ["a {subject} in the snow", "a {subject} on the beach"],
    }).write_parquet(tmp_path / "m.parquet")
    uris = reference_uris_from_manifest(tmp_path / "m.parquet")
    assert list(uris) == ["s1"] and [u.rsplit("/", 1)[-1] for u in uris["s1"]] == ["a.png", "b.png"]
    assert all(str(tmp_path) in u for u in uris["s1"])  # resolved against the manifest's folder
    assert reference_uris_from_folder(tmp_path) == {"imgs": [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]}
