"""The GPU suite's reduced CPU run (what CI can run): every row measured, and nothing but the model
side imported, so the real run works on a bare GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def test_the_suite_imports_only_the_model_side():
    banned = "{'polars', 'prefect', 'boto3', 'pyarrow', 'pydantic'}"
    probe = f"import runpy, sys; runpy.run_path({str(SUITE)!r}); print(sorted({{m.split('.')[0] for m in sys.modules}} & {banned}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_smoke_run_measures_every_row(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert [(r["model"], r["dtype"]) for r in rows] == [(m, d) for m in ("tiny SD", "tiny SDXL") for d in ("float32", "bfloat16")]
    for r in rows:
        assert r["train_s_per_step"] > 0 and r["sample_images_per_hour"] > 0 and r["diffusers_images_per_hour"] > 0
        assert 0.5 < r["guidance_cost"] < 10
    assert {r["mixed_precision"] for r in rows} == {"no", "bf16"}
    assert "| tiny SDXL | bfloat16 (bf16) |" in (tmp_path / "gpu_suite.md").read_text()
