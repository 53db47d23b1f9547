"""One spec per parameter: every entry point (manifest validate, ``prcore sample``, ``prcore train``,
the flow settings, DreamBench) refuses what the spec refuses, errors stay one short line, JSON
stays strict, ids follow the keys' rule, usage errors are one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from prcore.cli import build_app
from prcore.data.schema import (
    COLUMN_PARAMS,
    FLOAT,
    GENERATION_PARAMS,
    INT,
    MAX_PROMPT_CHARS,
    TRAIN_PARAMS,
    GenerationDefaults,
    Param,
    TrainConfig,
)
from prcore.data.validate import validate
from prcore.pipeline.settings import RunSettings
from prcore.store.keys import contact_sheet_key, is_safe_id

REPO = Path(__file__).resolve().parents[1]


def over_max(p: Param) -> float | int:
    """The smallest value past the spec's upper bound (keeps a multiple_of)."""
    step = p.spec.multiple_of or 1
    return int(p.spec.le) + step if p.kind == INT else float(p.spec.le) * 2 + 1


def bounded(params: dict[str, Param]) -> list[str]:
    return [n for n, p in params.items() if p.kind in (INT, FLOAT) and p.spec.le is not None]


def row(**cells) -> dict:
    return {"subject_id": "dog1", "instance_images": ["refs/0.png"], "class_noun": "dog", "prompt": "a {subject} on the beach", **cells}


def errors_on(**cells) -> list[str]:
    return [str(e) for e in validate(pl.DataFrame([row(**cells)]), check_images=False)]


def test_every_bounded_column_refuses_max_plus_one_in_validate():
    names = [n for n in bounded(COLUMN_PARAMS) if COLUMN_PARAMS[n].spec.le < 2**63 - 1]  # seeds: int64 itself is the bound
    assert {"num_inference_steps", "train_steps", "guidance_scale", "num_images", "height", "train_rank"} <= set(names)
    for column in names:
        p = COLUMN_PARAMS[column]
        assert errors_on(**{column: p.spec.le if p.kind == FLOAT else int(p.spec.le)}) == [], column
        errs = errors_on(**{column: over_max(p)})
        assert len(errs) == 1 and f"column {column}" in errs[0] and "out of range" in errs[0], (column, errs)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_scales_refused_by_validate(value):
    for column in ("guidance_scale", "consistency_scale", "parallel_scale", "consistency_stop", "train_dco_beta"):
        errs = errors_on(**{column: value})
        assert errs and "finite" in errs[0], (column, errs)


def test_settings_refuse_past_max_for_every_bounded_field():
    for name in bounded(GENERATION_PARAMS):
        with pytest.raises(ValidationError, match=name):
            RunSettings.model_validate({"generation": {name: over_max(GENERATION_PARAMS[name])}})
    for name in bounded(TRAIN_PARAMS):
        with pytest.raises(ValidationError, match=name):
            RunSettings.model_validate({"train": {name: over_max(TRAIN_PARAMS[name])}})
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        GenerationDefaults(guidance_scale=math.inf)
    with pytest.raises(ValueError, match="steps must be an integer in 1..10000"):
        TrainConfig(steps=10**9)


def cli(*args: object):
    return CliRunner().invoke(build_app("sample", "train"), [str(a) for a in args])


def one_line_exit_2(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, err
    for w in words:
        assert w in err, err
    return err


SAMPLE = ["sample", "--model", "no-such-model", "--prompt", "a {subject}", "--class-noun", "dog", "--out"]
TRAIN = ["train", "--model", "no-such-model", "--images", "no-such-dir", "--class-noun", "dog", "--out"]


def test_sample_cli_refuses_past_max_for_every_bounded_option(tmp_path):
    for name in [*bounded(GENERATION_PARAMS), "seed"]:
        p = GENERATION_PARAMS.get(name) or COLUMN_PARAMS["seed"]
        result = cli(*SAMPLE, tmp_path / "out", p.flags[0], over_max(p))
        one_line_exit_2(result, p.flags[0], "is not allowed")
    assert not (tmp_path / "out").exists()


def test_train_cli_refuses_past_max_for_every_bounded_option(tmp_path):
    for name in bounded(TRAIN_PARAMS):
        p = TRAIN_PARAMS[name]
        one_line_exit_2(cli(*TRAIN, tmp_path / "lora", p.flags[0], over_max(p)), p.flags[0], "is not allowed")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_sample_guidance_scale_non_finite_is_one_line(tmp_path, value):
    one_line_exit_2(cli(*SAMPLE, tmp_path / "out", "--guidance-scale", value), "--guidance-scale", "finite")


def test_cli_options_come_from_the_spec():
    """Every sampling and training parameter is an option of its command, with the spec's default."""
    from typer.main import get_command

    commands = get_command(build_app("sample", "train")).commands
    for command, params in (("sample", GENERATION_PARAMS), ("train", TRAIN_PARAMS)):
        options = {p.name: p for p in commands[command].params}
        for name, spec in params.items():
            assert name in options, (command, name)
            default = options[name].default
            expected = ",".join(spec.default) if isinstance(spec.default, tuple) else spec.default
            if not (command == "sample" and name == "num_images"):  # `prcore sample` draws one image unless told
                assert default == expected, (command, name, default)


def test_huge_prompt_refused_with_a_short_excerpt(tmp_path):
    prompt = "a {subject} " + "x" * 20_000
    errs = errors_on(prompt=prompt)
    assert len(errs) == 1 and "(20012 characters)" in errs[0] and len(errs[0]) < 300, errs
    err = one_line_exit_2(CliRunner().invoke(build_app("sample"), ["sample", "--model", "m", "--prompt", prompt, "--class-noun", "dog", "--out", str(tmp_path)]))
    assert f"the limit is {MAX_PROMPT_CHARS}" in err and len(err) < 300
    neg = errors_on(negative_prompt="y" * (MAX_PROMPT_CHARS + 1))
    assert len(neg) == 1 and "column negative_prompt" in neg[0] and len(neg[0]) < 300
    assert errors_on(prompt="a {subject} " + "x" * (MAX_PROMPT_CHARS - 12)) == []


def test_long_label_fits_the_contact_sheet_fast():
    from PIL import Image, ImageDraw

    from prcore.outputs.contact_sheet import _fit_text

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    start = time.perf_counter()
    fitted = _fit_text(draw, "a sks dog " * 2000, 600)
    assert time.perf_counter() - start < 1.0
    assert fitted.endswith("...") and draw.textlength(fitted) <= 600 and draw.textlength(fitted[:-3] + "x...") > 600 - 20


def test_subject_ids_validate_exactly_as_keys_build_them():
    candidates = ["a" * 128, "a" * 129, "dog.1", "a..b", ".dog", "d_-", "x/y", "é", "a" * 125 + ".png"]
    for sid in candidates:
        errs = [e for e in errors_on(subject_id=sid) if "column subject_id" in e]
        assert (not errs) == is_safe_id(sid), (sid, errs)
        if is_safe_id(sid):
            assert contact_sheet_key("r1", sid).endswith(f"{sid}.png")  # a valid id always has its keys
    assert "a" * 100 not in errors_on(subject_id="a" * 129)[0]  # quoted as an excerpt, not whole


def test_meta_nan_refused_and_sidecars_are_strict_json():
    errs = errors_on(meta_weight=math.nan)
    assert len(errs) == 1 and "column meta_weight" in errs[0] and "JSON" in errs[0]
    assert errors_on(meta_weight=1.5) == []
    assert any("meta_w" in e for e in [str(x) for x in validate(pl.DataFrame([row(meta_w=[1.0, math.inf])]), check_images=False)])

    from prcore.outputs.sidecar import ImageRecord, sidecar_bytes

    record = ImageRecord(subject_id="s", prompt_id="p", req_fp="0" * 16, index=0, key="k.png", seed=1, prompt_template="a {subject}",
                         personal_prompt="a sks dog", base_prompt="a dog", negative_prompt="", class_noun="dog", identifier="sks",
                         guidance="cfg", guidance_scale=7.5, consistency_scale=3.0, parallel_scale=0.5, num_inference_steps=2,
                         scheduler="ddim", height=32, width=32, base_model="m", lora_fp=None, device="cpu", dtype="float32")

    def strict(text: bytes):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    assert strict(sidecar_bytes(record))["guidance_scale"] == 7.5
    with pytest.raises(ValueError, match="JSON compliant"):
        sidecar_bytes(record.__class__(**{**record.__dict__, "extra": {"meta_x": math.nan}}))


def test_reports_write_nan_as_null(tmp_path):
    from prcore.outputs.reports import put_json
    from prcore.store.storage import LocalStore

    store = LocalStore(tmp_path)
    put_json(store, "runs/r/summary.json", {"mean_clip_t": math.nan, "n": [1.0, math.inf]})
    assert json.loads((tmp_path / "runs/r/summary.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {"mean_clip_t": None, "n": [1.0, None]}


def test_dreambench_defaults_and_bounds_come_from_the_spec():
    from prcore.quality.dreambench import BenchConfig, BenchError

    config, d = BenchConfig(model="m"), GenerationDefaults()
    for name in ("num_inference_steps", "guidance_scale", "consistency_scale", "parallel_scale", "height", "width", "scheduler", "identifier"):
        assert getattr(config, name) == getattr(d, name), name
    assert config.images_per_prompt == d.num_images
    with pytest.raises(BenchError, match="num_inference_steps must be an integer in 1..200"):
        BenchConfig(model="m", num_inference_steps=1000)
    with pytest.raises(BenchError, match="guidance_scale must be a finite"):
        BenchConfig(model="m", guidance_scale=math.inf)


def test_no_literal_sampling_defaults_outside_the_schema():
    """The default scales and step counts stand in prcore/data/schema.py only."""
    pattern = ("= 7.5", "= 3.0\n", "= 0.5\n", "= 50,", "= 50\n", "= 400", "= 1000.0", "(7.5)", "(400,", "(1000.0,")
    hits = [f"{p.relative_to(REPO)}: {needle!r}" for p in (REPO / "prcore").rglob("*.py") if p.name != "schema.py" and "toyworld" not in p.parts
            for needle in pattern if needle in p.read_text()]
    assert hits == []


def test_docs_table_matches_the_spec():
    text = (REPO / "docs" / "manifest_and_storage.md").read_text()
    for column, p in COLUMN_PARAMS.items():
        assert f"| `{column}` |" in text and p.spec.rule(p.kind) in text.split(f"| `{column}` |", 1)[1].splitlines()[0], column
    readme = (REPO / "README.md").read_text()
    outputs = readme.split("## Outputs", 1)[1].split("\n## ", 1)[0]
    assert "catalog/{subject_id}.parquet" in outputs and "hive_partitioning" not in outputs
    assert "catalog/run_date=YYYY" not in outputs


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["sample", "--prompt", "a {subject}"], "Missing option '--model'"),
        (["sample", "--model", "m", "--bogus", "1"], "No such option: --bogus"),
        (["sample", "--num-images", "many"], "Invalid value for '--num-images'"),
        (["train", "--rank", "x"], "Invalid value for '--rank'"),
    ],
)
def test_usage_errors_are_one_line(args, words):
    one_line_exit_2(CliRunner().invoke(build_app(), args), words)


def test_usage_error_one_line_from_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-c", "from prcore.cli import main; main()", "sample", "--prompt", "a {subject}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: Missing option '--model'") and "╭" not in proc.stderr


def test_run_cli_refuses_past_max_for_every_bounded_option(tmp_path):
    """`prcore run`'s defaults for null cells are the same specs (None: the settings' default)."""
    app = build_app("run")
    options = [(p.flags[0], over_max(p)) for n, p in GENERATION_PARAMS.items() if n in bounded(GENERATION_PARAMS)]
    options.append(("--train-steps", over_max(TRAIN_PARAMS["steps"])))
    for flag, value in options:
        result = CliRunner().invoke(app, ["run", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"), flag, str(value)])
        one_line_exit_2(result, flag, "is not allowed")
    assert not (tmp_path / "out").exists()


def test_every_request_parameter_is_recorded_in_sidecar_and_catalogue():
    """A new sampling column (a GenerationDefaults field) must reach the sidecar and the catalogue."""
    from dataclasses import fields

    from prcore.data.schema import REQUEST_PARAM_COLUMNS
    from prcore.outputs.catalog import SCALAR_FIELDS
    from prcore.outputs.sidecar import ImageRecord

    names = {f.name for f in fields(ImageRecord)}
    assert set(REQUEST_PARAM_COLUMNS) <= names and set(REQUEST_PARAM_COLUMNS) <= set(SCALAR_FIELDS)
