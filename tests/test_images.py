"""images.py, the one image loader: paths, bytes, PIL images, tensors and parquet references give the same pixels;
cover-and-crop to a size or a multiple; training's crop and flip with SDXL's size conditioning; PNG files written
atomically and read back exactly; bad input as one clear error."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import images


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_every_source_gives_the_same_pixels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    arr = _pixels(12, 20)
    want = torch.from_numpy(arr / 255).float().permute(2, 0, 1)[None]  # (1, 3, H, W)
    Image.fromarray(arr).save(tmp_path / "a.png")
    blob = (tmp_path / "a.png").read_bytes()
    pq.write_table(pa.table({"jpg_0": [b"", blob]}), tmp_path / "s.parquet")
    ref = images.parquet_ref(str(tmp_path / "s.parquet"), 1, "jpg_0")
    assert images.parse_ref(ref) == (str(tmp_path / "s.parquet"), 1, "jpg_0")
    for src in (str(tmp_path / "a.png"), blob, Image.fromarray(arr), ref, want[0]):
        torch.testing.assert_close(images.load_image(src), want, rtol=0, atol=1e-6)


def test_sizes_cover_crop_and_multiples():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # a white band in the middle: a centre crop keeps it
    x = images.load_image(Image.fromarray(arr), 16, 16)
    assert x.shape == (1, 3, 16, 16) and x[0, :, :, 4:12].min() > 0.9 and x.mean() > 0.5
    assert images.load_image(Image.fromarray(arr), multiple=16).shape == (1, 3, 16, 32)  # rounded down
    assert images.load_image(torch.rand(3, 20, 40), multiple=8).shape == (1, 3, 16, 40)
    with pytest.raises(ValueError, match="image is smaller than 8x8 pixels"):
        images.load_image(torch.rand(1, 3, 4, 6), multiple=8)


def test_training_crop_flip_and_size_conditioning():
    img = Image.fromarray(_pixels(30, 50))
    x, ids = images.transform(img, 20, None, False, False)  # short side 30 -> 20, width 50 -> 33, centre crop
    assert x.shape == (3, 20, 20) and -1 <= x.min() and x.max() <= 1
    assert ids.tolist() == [30, 50, 0, 6, 20, 20]  # original (h, w), crop (top, left), target size
    rng = np.random.default_rng(0)
    flips = [images.transform(img, 20, rng, True, True)[1][3].item() for _ in range(20)]
    assert len(set(flips)) > 1 and all(0 <= f <= 13 for f in flips)


def test_png_files_are_written_atomically_and_read_back_exactly(tmp_path):
    x = torch.rand(3, 8, 10)
    path = tmp_path / "a.png"
    images.save_png(images.to_pil(x), str(path))
    assert sorted(os.listdir(tmp_path)) == ["a.png"]  # no temporary file left
    back = images.load_image(str(path))[0]
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6  # rounded to 8 bits, nothing else
    g = images.grid([[x, x], [x, x]])
    assert g.size == (2 * 10 + 4, 2 * 8 + 4)


def test_bad_images_are_one_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        images.load_image(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match=r"cannot read image \(bytes\)"):
        images.load_image(io.BytesIO(b"x").getvalue())
