"""The one image decoder: any file Pillow reads -> an 8-bit RGB image, the same for training, validation,
predict and serve.

Pillow's own `convert("RGB")` clips deeper modes instead of scaling them: a 16-bit grey PNG (I;16)
or a 32-bit integer TIFF (I) came out all white, a float TIFF (F) with values in 0..1 all black. So:

- EXIF orientation is applied first (`ImageOps.exif_transpose`): a phone photo stored sideways is
  seen upright, as every viewer shows it; the manifest records the size so oriented.
- I;16, I;16B, I;16L, I;16N (16-bit unsigned): scaled by the type's range, v * 255 / 65535, rounded.
- I (32-bit signed): Pillow opens 16-bit data (PNG, TIFF) in this mode too, so values in 0..65535 are
  scaled as 16-bit; other values have no range to scale by and are refused, naming the file and mode.
- F (32-bit float): values in 0..1 are scaled by 255, rounded; other values (or NaN) are refused.
- Transparency (LA, RGBA, PA, La, RGBa, P with a transparent colour): composited onto white, what a
  viewer shows on a page, rather than dropping the alpha (which shows the colour of invisible pixels).
- 1, L, P, CMYK, YCbCr, RGBX: Pillow's conversion (grey replicated; CMYK as (255 - C)(255 - K) / 255).
- anything else (LAB, HSV, ...): refused by name.
"""

from __future__ import annotations

from spottune.errors import DataError


class ImageTooLarge(DataError):
    """More pixels than allowed: refused from the header."""


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
WITH_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")
BY_PILLOW = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX")


def open_image(source, name: str, max_pixels: int | None = None):
    """An upright 8-bit RGB image from a path or a binary file; DataError naming `name` when it does not decode.

    Images over `max_pixels` (default: Pillow's Image.MAX_IMAGE_PIXELS, about 89 Mpx) are refused
    from their header, before any decoding (ImageTooLarge): Pillow itself only warns up to twice
    that and raises a non-OSError above it, so a decompression bomb would otherwise exhaust memory
    or crash with a traceback.
    """
    from PIL import Image

    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(source) as img:
            width, height = img.size
            if limit and width * height > limit:
                raise ImageTooLarge(f"refused image {name}: {width}x{height} pixels exceeds the limit of "
                                    f"{limit} (a decompression bomb?)")
            return to_rgb(img, name)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"refused image {name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {name}: {e}") from None


def to_rgb(img, name: str):
    """`img` upright and as 8-bit RGB, by the rules in the module docstring."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        return _grey(_scaled_integers(img, name), img.size)
    if mode == "F":
        return _grey(_scaled_floats(img, name), img.size)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in WITH_ALPHA:
        return _on_white(img)
    if mode in BY_PILLOW:
        return img.convert("RGB")
    raise DataError(f"cannot use image {name}: mode {mode} has no conversion to RGB here (save it as RGB or grey)")


def _scaled_integers(img, name: str):
    import numpy as np

    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"cannot use image {name}: mode {img.mode} holds values {values.min()}..{values.max()}, "
                        "outside 0..65535: no range to scale them to 8 bits by (save it as 8 or 16 bits)")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # v * 255 / 65535, rounded half up


def _scaled_floats(img, name: str):
    import numpy as np

    values = np.asarray(img).astype(np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise DataError(f"cannot use image {name}: mode F (float) holds values outside 0..1 "
                        f"({np.nanmin(values):.4g}..{np.nanmax(values):.4g}, or NaN): no range to scale them "
                        "to 8 bits by (save it as 8 or 16 bits)")
    return np.floor(values * 255 + 0.5).astype(np.uint8)


def _grey(values, size):
    from PIL import Image

    return Image.fromarray(values, "L").convert("RGB") if values.size else Image.new("RGB", size)


def _on_white(img):
    """Alpha composited onto white: c * a / 255 + 255 * (1 - a / 255), rounded, per channel."""
    import numpy as np
    from PIL import Image

    rgba = np.asarray(img.convert("RGBA")).astype(np.int64)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")
