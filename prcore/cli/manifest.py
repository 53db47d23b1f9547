"""``prcore manifest validate|show|init``."""

from __future__ import annotations

import csv
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from prcore.cli.errors import USER_ERROR_EXIT, UserError, user_errors
from prcore.data.schema import IMAGE_SUFFIXES

manifest_app = typer.Typer(help="Check, summarise and create Parquet manifests (schema: manifests/README.md).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(manifest_app, name="manifest")


def _store_errors() -> tuple[type[BaseException], ...]:
    from prcore.store.storage import StoreError

    return (StoreError,)


@manifest_app.command("validate")
def validate_cmd(
    path: Annotated[str, typer.Argument(help="Parquet file, folder or glob of Parquet files, or s3:// prefix")],
    check_images: Annotated[bool, typer.Option("--check-images/--no-check-images", help="Open every instance image (slower)")] = True,
    max_errors: Annotated[int, typer.Option(help="Print at most this many errors (0: all)")] = 0,
    model: Annotated[str | None, typer.Option("--model", help="The run's base model, for rows without base_model: "
                                              "train_target_modules, schedulers and training options are checked against its family (default: the embedded model)")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="The run's cache folder (where the embedded tiny model is built)")] = None,
) -> None:
    """Check a manifest. Exit 0 when valid; exit 2 with one line per error: row N (subject S), column C: message."""
    from prcore.data.load import load_manifest
    from prcore.data.validate import validate

    def known(base: str | None, ask):
        from prcore.pipeline.models import default_model_id
        from prcore.pipeline.settings import RunSettings

        return ask(base, model or default_model_id(), RunSettings(cache_dir=cache_dir).cache_path())

    from prcore.pipeline.models import layer_names, model_rules

    with user_errors(*_store_errors()):
        manifest = load_manifest(path)
        errors = validate(manifest, check_images=check_images, module_names=lambda base: known(base, layer_names),
                          model_rules=lambda base: known(base, model_rules))
    if not errors:
        subjects = manifest.df["subject_id"].n_unique() if "subject_id" in manifest.df.columns else 0
        print(f"{path}: valid ({manifest.df.height} rows, {subjects} subjects)")
        return
    shown = errors if max_errors <= 0 else errors[:max_errors]
    for err in shown:
        print(str(err), file=sys.stderr)
    if len(shown) < len(errors):
        print(f"... and {len(errors) - len(shown)} more error(s)", file=sys.stderr)
    print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
    raise typer.Exit(USER_ERROR_EXIT)


@manifest_app.command("show")
def show_cmd(
    path: Annotated[str, typer.Argument(help="Parquet file, folder or glob of Parquet files, or s3:// prefix")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output root (folder or s3://bucket/prefix) to count what is done")] = None,
    subjects: Annotated[int, typer.Option(help="List at most this many subjects")] = 20,
) -> None:
    """Subjects, requests, images, already done and to do."""
    from prcore.data.load import load_manifest
    from prcore.data.plan import plan
    from prcore.store.storage import open_store

    with user_errors(*_store_errors()):
        manifest = load_manifest(path)
        store = open_store(output) if output else None
        jobs = plan(manifest, store=store)
    n_req = sum(j.n_requests for j in jobs)
    n_img = sum(j.n_images for j in jobs)
    n_done = sum(j.n_done for j in jobs)
    print(f"manifest: {path}")
    print(f"subjects: {len(jobs)}")
    print(f"requests: {n_req}")
    print(f"images:   {n_img}")
    print(f"done:     {n_done}" + ("" if output else "  (no --output given)"))
    print(f"to do:    {n_img - n_done}")
    if jobs and subjects > 0:
        width = max(len(j.subject_id) for j in jobs[:subjects])
        print()
        print(f"{'subject':<{width}}  class noun            requests  images  done  to do")
        for j in jobs[:subjects]:
            print(f"{j.subject_id:<{width}}  {j.class_noun[:20]:<20}  {j.n_requests:>8}  {j.n_images:>6}  {j.n_done:>4}  {j.n_todo:>5}")
        if len(jobs) > subjects:
            print(f"... and {len(jobs) - subjects} more subject(s)")


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{path} holds no prompt templates (one per line, with {{subject}})")
    return prompts


def _read_class_nouns(path: Path) -> dict[str, tuple[str, str | None]]:
    """CSV with a header holding subject_id and class_noun (and optionally kind: object | live)."""
    if not path.is_file():
        raise UserError(f"class nouns file not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        if not {"subject_id", "class_noun"} <= fields:
            raise UserError(f"{path} must be a CSV with a header naming subject_id and class_noun (optionally kind); found {sorted(fields)}")
        return {row["subject_id"].strip(): (row["class_noun"].strip(), (row.get("kind") or "").strip() or None) for row in reader}


def _guess_class_noun(subject_id: str) -> str:
    return re.sub(r"\d+$", "", subject_id).replace("_", " ").replace("-", " ").strip() or subject_id


@manifest_app.command("init")
def init_cmd(
    subjects: Annotated[Path, typer.Option("--subjects", help="Folder with one sub-folder of reference images per subject")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Text file of prompt templates, one per line, with {subject}")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Manifest to write (.parquet)")],
    class_nouns: Annotated[Path | None, typer.Option("--class-nouns", help="CSV: subject_id,class_noun[,kind]")] = None,
    live_prompts: Annotated[Path | None, typer.Option("--live-prompts", help="Templates for subjects whose kind is 'live' in --class-nouns")] = None,
    num_images: Annotated[int | None, typer.Option(help="Images per prompt (default: the flow's, 4)")] = None,
    identifier: Annotated[str | None, typer.Option(help="Identifier token (default: the flow's, 'sks')")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file")] = False,
) -> None:
    """Write a manifest from a DreamBooth-style folder of subjects and a file of prompt templates."""
    import polars as pl

    from prcore.data.load import load_manifest
    from prcore.data.validate import validate
    from prcore.store.keys import is_safe_id

    with user_errors(*_store_errors()):
        if not subjects.is_dir():
            raise UserError(f"--subjects {subjects} is not a folder (expected one sub-folder of images per subject)")
        if out.exists() and not force:
            raise UserError(f"{out} exists; pass --force to overwrite it")
        if out.suffix != ".parquet":
            raise UserError(f"--output {out} must end in .parquet")
        templates = _read_prompts(prompts)
        live = _read_prompts(live_prompts) if live_prompts else None
        nouns = _read_class_nouns(class_nouns) if class_nouns else {}
        out_dir = out.resolve().parent
        rows = []
        guessed = []
        for folder in sorted(p for p in subjects.iterdir() if p.is_dir()):
            sid = folder.name
            if not is_safe_id(sid):
                raise UserError(f"sub-folder name {sid!r} is not a safe subject_id (letters, digits, '.', '_', '-'); rename it")
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            if nouns and sid not in nouns:
                raise UserError(f"subject {sid!r} is missing from {class_nouns}; add a row '{sid},<class noun>'")
            noun, kind = nouns.get(sid, (_guess_class_noun(sid), None))
            if sid not in nouns:
                guessed.append(f"{sid} -> {noun!r}")
            uris = [os.path.relpath(p.resolve(), out_dir) for p in images]
            for template in live if (live and kind == "live") else templates:
                rows.append(
                    {"subject_id": sid, "instance_images": uris, "class_noun": noun, "prompt": template, "num_images": num_images, "identifier": identifier}
                )
        if not rows:
            raise UserError(f"{subjects} has no sub-folders; expected one folder of reference images per subject")
        df = pl.DataFrame(rows, schema={"subject_id": pl.String, "instance_images": pl.List(pl.String), "class_noun": pl.String, "prompt": pl.String, "num_images": pl.Int64, "identifier": pl.String})
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=out.parent)
        os.close(fd)
        try:
            df.write_parquet(tmp)
            errors = validate(load_manifest(tmp), check_images=True)
            if errors:
                for err in errors:
                    print(str(err), file=sys.stderr)
                raise UserError(f"the manifest built from {subjects} and {prompts} is invalid ({len(errors)} error(s) above); nothing written")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if guessed:
        print(f"class nouns guessed from folder names (pass --class-nouns to set them): {', '.join(guessed)}", file=sys.stderr)
    print(f"wrote {out}: {df.height} rows, {df['subject_id'].n_unique()} subjects, {len(templates)} prompts")
