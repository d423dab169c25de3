"""The image decoder (spottune/data/images.py) against the values written: real PNG, TIFF and JPEG files of
every mode and bit depth a data folder or an upload may hold, with EXIF orientations, decoded as
training, validation and predict decode them. The expected pixels are computed here from the source
arrays with numpy, by the rules the decoder documents; tolerances only for JPEG (lossy)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from spottune.data.images import open_image
from spottune.errors import DataError

ORIENTATION = 0x0112


def _muldiv255(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b / 255 rounded to nearest, as Pillow's integer arithmetic computes it."""
    t = a.astype(np.int64) * b + 128
    return ((t >> 8) + t) >> 8


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.int64) * alpha[..., None] + 255 * (255 - alpha[..., None].astype(np.int64)) + 127) // 255


def _grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def _upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows of stored pixels `a` (H, W, C) with this EXIF orientation."""
    return {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2),
            6: np.rot90(a, -1), 7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1)}[orientation]


@st.composite
def images(draw):
    """(PIL image to save, format, expected RGB array or None when the decoder must refuse it)."""
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["L", "1", "RGB", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16", "I;16B",
                                 "I", "I out of range", "F", "F out of range"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u8 = lambda *shape: rng.integers(0, 256, size=(h, w, *shape), dtype=np.uint8)
    if kind == "L":
        v = u8()
        return Image.fromarray(v, "L"), "PNG", _grey3(v)
    if kind == "1":
        v = rng.integers(0, 2, size=(h, w)).astype(bool)
        return Image.fromarray(v).convert("1"), "PNG", _grey3(np.where(v, 255, 0))
    if kind == "RGB":
        v = u8(3)
        return Image.fromarray(v, "RGB"), draw(st.sampled_from(["PNG", "TIFF"])), v
    if kind in ("LA", "RGBA"):
        v = u8(2 if kind == "LA" else 4)
        rgb = _grey3(v[..., 0]) if kind == "LA" else v[..., :3]
        return Image.fromarray(v, kind), "PNG", _on_white(rgb, v[..., -1])
    if kind.startswith("P"):
        palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
        index = u8()
        img = Image.fromarray(index, "P")
        img.putpalette(palette.tobytes())
        expected = palette[index].astype(np.int64)
        if kind == "P+transparency":
            clear = int(index[0, 0])
            img.info["transparency"] = clear
            expected[index == clear] = 255
        return img, "PNG", expected
    if kind == "CMYK":
        v = u8(4)
        return Image.fromarray(v, "CMYK"), "TIFF", _muldiv255(255 - v[..., :3], 255 - v[..., 3:4])
    if kind in ("I;16", "I;16B"):
        v = rng.integers(0, 65536, size=(h, w)).astype(np.uint16)
        v[0, 0] = draw(st.sampled_from([0, 65535, 257, 128, 32767]))  # the ends and the rounding points
        img = Image.frombytes(kind, (w, h), v.astype("<u2" if kind == "I;16" else ">u2").tobytes())
        return img, "PNG" if kind == "I;16" else "TIFF", _grey3((v.astype(np.int64) * 255 + 32767) // 65535)
    if kind.startswith("I"):
        v = rng.integers(0, 65536, size=(h, w)).astype(np.int32)
        if kind == "I out of range":
            v[rng.integers(h), rng.integers(w)] = draw(st.sampled_from([-1, 65536, 2**31 - 1, -(2**31)]))
            return Image.fromarray(v, "I"), "TIFF", None
        return Image.fromarray(v, "I"), "TIFF", _grey3((v.astype(np.int64) * 255 + 32767) // 65535)
    v = rng.random(size=(h, w)).astype(np.float32)
    v[0, 0] = draw(st.sampled_from([0.0, 1.0, 0.5 / 255, 0.25]))
    if kind == "F out of range":
        v[rng.integers(h), rng.integers(w)] = draw(st.sampled_from([-0.01, 1.5, 255.0, float("nan")]))
        return Image.fromarray(v, "F"), "TIFF", None
    return Image.fromarray(v, "F"), "TIFF", _grey3(np.floor(v.astype(np.float64) * 255 + 0.5))


def _save(img: Image.Image, fmt: str, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    extra = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        extra["exif"] = exif
    img.save(buf, fmt, **extra)
    return buf.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=images(), orientation=st.integers(1, 8))
def test_every_mode_and_bit_depth_decodes_to_the_source_values_upright(case, orientation):
    img, fmt, expected = case
    data = _save(img, fmt, orientation)
    if expected is None:
        with pytest.raises(DataError, match=f"upload.{fmt.lower()}: mode {img.mode}.*outside 0..") as err:
            open_image(io.BytesIO(data), f"upload.{fmt.lower()}")
        assert "\n" not in str(err.value)
        return
    decoded = open_image(io.BytesIO(data), f"upload.{fmt.lower()}")
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), _upright(np.asarray(expected, dtype=np.uint8), orientation))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), orientation=st.integers(1, 8), size=st.tuples(st.integers(2, 6), st.integers(2, 6)))
def test_a_jpeg_photo_is_decoded_upright_within_jpegs_loss(seed, orientation, size):
    """JPEG is lossy: blocks of flat colour (16x16 px, quality 95, no chroma subsampling) come back within a
    few levels on average, and in the orientation EXIF gives."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    source = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(source, "RGB").save(buf, "JPEG", quality=95, subsampling=0, exif=exif)
    decoded = np.asarray(open_image(io.BytesIO(buf.getvalue()), "photo.jpg")).astype(np.int64)
    expected = _upright(source, orientation).astype(np.int64)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 4


def test_training_validation_and_the_manifest_see_the_same_upright_image(tmp_path):
    """A 16-bit grey PNG stored sideways (orientation 6): the manifest lists it upright, validation decodes it,
    training's loader and predict get the same upright, scaled pixels. Before, it loaded all white and sideways."""
    from spottune.data.loaders import load_rgb
    from spottune.data.manifest import ManifestRow, describe_file
    from spottune.data.validation import check_images

    v = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    path = tmp_path / "sideways.png"
    path.write_bytes(_save(Image.frombytes("I;16", (4, 3), v.astype("<u2").tobytes()), "PNG", 6))
    width, height, mode, size, digest = describe_file(path)
    assert (width, height, mode) == (3, 4, "I;16")
    decoded = np.asarray(load_rgb(str(path)))
    expected = _upright(_grey3((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8), 6)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.shape == (height, width, 3)
    row = ManifestRow("sideways.png", "x", "train", width, height, mode, size, digest)
    assert not any(check_images(tmp_path, [row], 10_000).values())
    (tmp_path / "float.tif").write_bytes(_save(Image.fromarray(np.full((2, 2), 7.5, np.float32), "F"), "TIFF"))
    bad = check_images(tmp_path, [ManifestRow("float.tif", "x", "train", 2, 2, "F", 1, "0" * 64)], 10_000)
    assert bad["file_decodes"] and "mode F" in bad["file_decodes"][0] and "outside 0..1" in bad["file_decodes"][0]
