"""Images in and out: where an image lives (a path, bytes, or a reference into a parquet shard), the one loader
that turns any of them into a tensor (for training data, sampling, evaluation and the demo), training's crop, and
PNG files out (atomically) and side-by-side grids.
"""
import io
import re
from typing import List

import numpy as np
import torch
from PIL import Image

import hub
import weights

# ----------------------------------------------------------------------------------------------------
# Where an image lives: a file, bytes, or a cell of a parquet shard (Pick-a-Pic keeps its JPEGs in parquet columns)


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow (pip install pyarrow), or give a JSONL file") from None
    return pq


def parquet_file(file: str):
    """A pyarrow ParquetFile of a local path or a hf:// shard of a hub dataset (read by byte ranges: the footer, then
    only the column chunks of the row groups read)."""
    return pyarrow_parquet().ParquetFile(hub.open_file(file) if hub.remote(file) else file)


REF = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)&col=(?P<col>\w+)$")


def parquet_ref(file: str, row: int, col: str) -> str:
    """An image inside a parquet shard, as a JSONL image entry: "FILE#row=R&col=C" (row R counted from 0 over the
    whole file, C the image column), so relabelled Pick-a-Pic pairs point at its images instead of copying them."""
    return f"{file}#row={row}&col={col}"


def parse_ref(src):
    """(file, row, column) of a parquet_ref string; None for anything else (a path, bytes)."""
    m = REF.match(src) if isinstance(src, str) else None
    return (m.group("file"), int(m.group("row")), m.group("col")) if m else None


def parquet_layout(file: str):
    """(first row of each row group with the row count last (groups + 1,), column names) of a parquet file."""
    try:
        pf = parquet_file(file)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read parquet file {file}: {why}") from None
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    return np.cumsum([0] + sizes), pf.schema_arrow.names


def check_ref(layout, file: str, row: int, col: str):
    """Refuse a reference to a row or column the file does not have."""
    starts, names = layout
    if col not in names:
        raise ValueError(f"{file} has no column {col} (its columns: {', '.join(names)})")
    if not 0 <= row < starts[-1]:
        raise ValueError(f"{file} has {starts[-1]} rows, no row {row}")


def read_cell(file: str, row: int, col: str, cache=None, layout=None):
    """The image at (row, col) of a parquet file, its bytes. Its row group's column is decoded once and kept in
    `cache` (an OrderedDict the caller trims as an LRU), so reading a row group's images one by one decodes it once."""
    layout = parquet_layout(file) if layout is None else layout
    check_ref(layout, file, row, col)
    starts = layout[0]
    g = int(np.searchsorted(starts, row, side="right")) - 1
    key = (file, g, col)
    if cache is not None and key in cache:
        cache.move_to_end(key)
        column = cache[key]
    else:
        column = parquet_file(file).read_row_group(g, columns=[col]).column(col)
        if cache is not None:
            cache[key] = column
    return cell_image(column[row - int(starts[g])].as_py())  # an image's bytes, from a Hugging Face struct too


# ----------------------------------------------------------------------------------------------------
# Reading


def cell_image(value):
    """An image cell of a parquet set: bytes (Pick-a-Pic), or the {bytes, path} struct of Hugging Face datasets'
    Image feature."""
    return value.get("bytes") if isinstance(value, dict) else value


def open_image(src) -> Image.Image:
    """Decode JPEG/PNG bytes, a file path or a parquet_ref to RGB (raises on corrupt or missing images)."""
    ref = parse_ref(src)
    if ref is not None:
        src = read_cell(*ref)
    img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    img.load()
    return img.convert("RGB")


def load_image(img, height=None, width=None, multiple=1) -> torch.Tensor:
    """A path, image bytes, PIL image or [3,H,W] / [B,3,H,W] tensor in [0,1] -> [B,3,H,W] in [0,1] at height x
    width (default: its own size rounded down to `multiple`); PIL images are scaled to cover and centre-cropped."""
    if isinstance(img, torch.Tensor):
        x = (img[None] if img.dim() == 3 else img).float()
        size = (height or x.shape[-2] // multiple * multiple, width or x.shape[-1] // multiple * multiple)
        if min(size) == 0:
            raise ValueError(f"image is smaller than {multiple}x{multiple} pixels")
        return x if size == x.shape[-2:] else torch.nn.functional.interpolate(x, size, mode="bicubic").clamp(0, 1)
    try:
        img = img.convert("RGB") if isinstance(img, Image.Image) else open_image(img)
    except Exception as e:
        raise ValueError(f"cannot read image {img if isinstance(img, str) else '(bytes)'}: {e}") from None
    w, h = img.size
    H, W = height or h // multiple * multiple, width or w // multiple * multiple
    if H == 0 or W == 0:
        raise ValueError(f"image is smaller than {multiple}x{multiple} pixels")
    if (h, w) != (H, W):
        s = max(H / h, W / w)  # scale to cover H x W, then crop the centre
        img = img.resize((max(W, round(w * s)), max(H, round(h * s))), Image.LANCZOS)
        left, top = (img.width - W) // 2, (img.height - H) // 2
        img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def transform(img: Image.Image, res: int, rng: np.random.Generator, random_crop: bool, flip: bool):
    """Resize the short side to res, crop res x res (center or random), maybe flip.

    Returns pixels (3, res, res) in [-1, 1] and SDXL's size conditioning (orig_h, orig_w, crop_top, crop_left,
    res, res), taken from this image's true size and crop (the official code passed constants).
    """
    w, h = img.size
    s = res / min(w, h)
    nw, nh = max(res, round(w * s)), max(res, round(h * s))
    img = img.resize((nw, nh), Image.BILINEAR)
    top = int(rng.integers(0, nh - res + 1)) if random_crop else (nh - res) // 2
    left = int(rng.integers(0, nw - res + 1)) if random_crop else (nw - res) // 2
    img = img.crop((left, top, left + res, top + res))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = nw - res - left  # the crop as seen in the mirrored image
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0  # (3, res, res)
    return x, torch.tensor([h, w, top, left, res, res], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Writing


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB image (rounded as diffusers' numpy_to_pil)."""
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def png_bytes(x: torch.Tensor) -> bytes:
    """[3,H,W] in [0,1] -> the bytes of its 8-bit PNG file, as a sample is saved (what a reward server receives)."""
    buf = io.BytesIO()
    to_pil(x.clamp(0, 1)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Image.Image, path):
    """Write atomically (weights.atomic): a crash never leaves a truncated PNG under the final name."""
    weights.atomic(path, img.save, suffix=".png")


def grid(rows: List[List[torch.Tensor]]) -> Image.Image:
    """One image: rows[r][c] [3,H,W] tiles (rows = prompts, columns = base, tuned) with 4-pixel gaps."""
    H, W, g = rows[0][0].shape[1], rows[0][0].shape[2], 4
    out = Image.new("RGB", (len(rows[0]) * (W + g) - g, len(rows) * (H + g) - g), "white")
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            out.paste(to_pil(x), (c * (W + g), r * (H + g)))
    return out
