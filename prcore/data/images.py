"""Input hygiene for instance images: decode, orient, convert, check size, resize and center-crop.

Every error a user can cause here is an ``ImageInputError`` (a ``ValueError``) with one message
that names the image and says what to do.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from prcore.data.schema import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, MAX_INPUT_BYTES

ImageSource = Image.Image | bytes | str | Path


class ImageInputError(ValueError):
    """An instance image that cannot be used (unreadable, truncated, too small, none given)."""


class NoImagesError(ImageInputError):
    pass


class UnreadableImageError(ImageInputError):
    pass


class ImageTooSmallError(ImageInputError):
    pass


class ImageTooLargeError(ImageInputError):
    pass


def min_image_side(resolution: int) -> int:
    """Smallest accepted shorter side: half the training resolution (more upscaling only adds blur)."""
    return max(1, resolution // 2)


def describe(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return f"'{source}'"
    name = getattr(source, "filename", "") if isinstance(source, Image.Image) else ""
    return f"'{name}'" if name else f"#{index}"


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, at most ``limit`` (default ``PRCORE_MAX_INPUT_BYTES`` or MAX_INPUT_BYTES).
    Opened non-blocking so a FIFO never hangs; FIFOs, devices and sockets are refused before any read.
    (``prcore.store.uris.read_uri_bytes`` does the same for every URI; this is the model side's copy.)"""
    import os
    import stat

    raw = os.environ.get("PRCORE_MAX_INPUT_BYTES")
    limit = limit if limit is not None else (int(raw) if raw and raw.isdigit() else MAX_INPUT_BYTES)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableImageError(f"instance image '{path}' is not a regular file (a FIFO, device or socket); give an image file")
        if st.st_size > limit:
            raise UnreadableImageError(f"instance image '{path}' is {st.st_size} bytes, over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
        os.set_blocking(fh.fileno(), True)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnreadableImageError(f"instance image '{path}' is over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
    return data


def max_image_pixels() -> int:
    import os

    raw = os.environ.get("PRCORE_MAX_IMAGE_PIXELS")
    return int(raw) if raw and raw.isdigit() else MAX_IMAGE_PIXELS


def check_pixels(img: Image.Image, label: str) -> None:
    """Refuse an image with more than :func:`max_image_pixels` pixels (read from its header)."""
    w, h = img.size
    if w * h > max_image_pixels():
        raise ImageTooLargeError(f"instance image {label} is {w}x{h} = {w * h} pixels, over the {max_image_pixels()}-pixel "
                                 "limit (PRCORE_MAX_IMAGE_PIXELS); downscale it")


def open_image(source: ImageSource, index: int = 0, *, label: str | None = None) -> Image.Image:
    """Open one image (a PIL image, encoded bytes, or a file path) and decode every pixel.

    The pixel count is checked from the header first (:func:`check_pixels`); then ``load()`` decodes
    the whole image, so a truncated file (a JPEG or PNG cut short) fails here, naming the file,
    not halfway through training. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its
    default): prcore never sets it. The result is the file's own mode, not yet oriented or converted
    (:func:`viewer_rgb` does that).
    """
    label = label or describe(source, index)
    try:
        if isinstance(source, Image.Image):
            img = source
            check_pixels(img, label)
            img.load()
        else:
            if isinstance(source, (str, Path)):
                data = read_regular_file(Path(source))  # regular files only, size-capped
            else:
                data = bytes(source)
            img = Image.open(io.BytesIO(data))
            check_pixels(img, label)  # from the header, before any pixel is decoded
            img.load()
    except ImageInputError:
        raise
    except FileNotFoundError as exc:
        raise UnreadableImageError(f"instance image {label} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(
            f"instance image {label} cannot be read ({exc.__class__.__name__}: {exc}); "
            "it is not an image or it is truncated/corrupt: replace the file"
        ) from exc
    return img


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image (16-bit ``I;16*``, 32-bit ``I``, float ``F``) as 8-bit ``L``,
    scaled the way a viewer shows it: 16-bit values 0..65535 map to 0..255 (/257); an ``I`` or ``F``
    image is read as 16-bit when it holds values above 255, as 8-bit otherwise (``F`` in 0..1: x255).
    Pillow's own ``convert`` clips these modes at 255, so a 16-bit gray decodes as white."""
    import numpy as np

    a = np.asarray(img).astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if img.mode in _SIXTEEN_BIT or top > 255:
        a = a / 257.0
    elif img.mode == "F" and top <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def viewer_rgb(img: Image.Image) -> Image.Image:
    """The RGB picture an image viewer shows for ``img``: EXIF orientation applied, 16-bit / 32-bit /
    float grayscale scaled to 8 bits (:func:`_to_eight_bit`), a palette expanded, transparency
    (an alpha channel, a palette's or a ``tRNS`` colour) composited on white, CMYK converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        img = _to_eight_bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(source: ImageSource, index: int = 0, *, label: str | None = None) -> Image.Image:
    """Open and fully decode one image (a PIL image, encoded bytes, or a file path) as the RGB
    picture a viewer shows: :func:`open_image`, then :func:`viewer_rgb`."""
    return viewer_rgb(open_image(source, index, label=label))


def fingerprint_bytes(source: ImageSource, index: int = 0) -> bytes:
    """Bytes that identify an image for fingerprints.

    Encoded bytes and files are hashed as they are (so a caller holding the file bytes computes the
    same LoRA fingerprint); a PIL image is identified by its decoded, oriented RGB pixels and size.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        try:
            return Path(source).read_bytes()
        except OSError as exc:
            raise UnreadableImageError(f"instance image '{source}' cannot be read: {exc.strerror or exc}") from exc
    img = decode_image(source, index)
    return f"RGB {img.width}x{img.height}\n".encode() + img.tobytes()


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the VAE, with what SDXL's micro-conditioning needs to know about it."""

    image: Image.Image  # RGB, resolution x resolution
    original_size: tuple[int, int]  # (height, width) after orientation, before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def resize_center_crop(img: Image.Image, resolution: int) -> PreparedImage:
    """Resize the shorter side to ``resolution`` (Lanczos), then center-crop a square."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = img.resize((new_w, new_h), Image.Resampling.LANCZOS) if (new_w, new_h) != (w, h) else img
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    return PreparedImage(cropped, (h, w), (top, left))


def prepare_images(sources: Sequence[ImageSource], resolution: int) -> list[PreparedImage]:
    """Decode, check and square-crop every instance image; errors name the offending image."""
    if not sources:
        raise NoImagesError("no instance images: give at least one image of the subject")
    minimum = min_image_side(resolution)
    prepared = []
    for i, source in enumerate(sources):
        img = decode_image(source, i)
        if min(img.size) < minimum:
            raise ImageTooSmallError(
                f"instance image {describe(source, i)} is {img.width}x{img.height} pixels; the shorter side must be "
                f"at least {minimum} pixels (half the training resolution {resolution}): use a larger image"
            )
        prepared.append(resize_center_crop(img, resolution))
    return prepared




def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (their image files, sorted by name, not recursive) and keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise UnreadableImageError(f"instance image path '{p}' does not exist")
    if not out:
        raise NoImagesError(f"no instance images found in {', '.join(map(str, paths)) or '(nothing given)'}: "
                            f"give image files or a folder holding {'/'.join(IMAGE_SUFFIXES)} files")
    return out
