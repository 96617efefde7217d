"""Reading and writing images, atomically.

- `read_array` / `write_array`: numpy arrays as stored: (H, W) grayscale, (H, W, 3) RGB or
  (H, W, 4) RGBA, uint8 or uint16. 16-bit PNGs (which Pillow only reads as grayscale) go
  through a small PNG codec here, so 16-bit RGB/RGBA stay 16-bit.
- `read_image` / `write_image`: (1, 3, H, W) float32 RGB tensors in [0, 1].
Writes go to a temporary file in the target folder renamed into place
(`atomic.atomic_write`): never a half-written file.
"""
from __future__ import annotations

import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic import atomic_write

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Images declaring more pixels are refused before decoding (image_size, read_array): the
# default admits 12000 x 12000 (144 MP) and refuses the 200000 x 200000 of a tiny hostile PNG.
MAX_PIXELS = 150_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # read and written
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def supported_extensions() -> set[str]:
    """Lower-case file suffixes (".png", ...) that Pillow can both read and write."""
    Image.init()
    ext = Image.registered_extensions()
    return {e for e, fmt in ext.items() if fmt in Image.OPEN and fmt in Image.SAVE}


# --- 16-bit PNG codec -------------------------------------------------------------------

def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo PNG's per-row filters: (height, stride) uint8."""
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for r in range(height):
        kind, line = rows[r, 0], rows[r, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: cumulative along the row, per byte position in the pixel
            cur = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:  # Up
            cur = (line + prev) & 255
        elif kind in (3, 4):  # Average, Paeth: sequential along the row
            vals, up = line.tolist(), prev.tolist()
            for i in range(stride):
                left = vals[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (left + up[i]) >> 1
                else:
                    ul = up[i - bpp] if i >= bpp else 0
                    p = left + up[i] - ul
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else ul)
                vals[i] = (vals[i] + pred) & 255
            cur = np.array(vals, np.int64)
        else:
            raise ValueError(f"corrupt PNG: unknown row filter {kind}")
        out[r] = cur
        prev = cur
    return out


def _read_png16(data: bytes) -> np.ndarray:
    """A non-interlaced 16-bit PNG as uint16 (H, W) or (H, W, C); gray+alpha becomes RGBA."""
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        body = data[pos + 8: pos + 8 + length]
        crc = data[pos + 8 + length: pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ValueError("truncated PNG")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"corrupt PNG: bad CRC in {kind.decode('latin-1')!r} chunk")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("corrupt PNG: no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if width == 0 or height == 0:
        raise ValueError(f"image is {width}x{height}; it must be at least 1x1")
    if depth != 16 or colour not in _PNG_CHANNELS:
        raise ValueError(f"unsupported PNG: bit depth {depth}, colour type {colour}")
    if interlace:
        raise ValueError("unsupported PNG: interlaced 16-bit images")
    channels = _PNG_CHANNELS[colour]
    stride = width * channels * 2
    expected = height * (stride + 1)
    try:  # inflate at most what the header declares: a small file cannot expand to gigabytes
        inflater = zlib.decompressobj()
        raw = inflater.decompress(b"".join(idat), expected)
        if inflater.unconsumed_tail:
            raise ValueError(f"corrupt PNG: more image data than its {width}x{height} header "
                             f"declares")
    except zlib.error as e:
        raise ValueError(f"corrupt PNG image data ({e})") from e
    if len(raw) != expected:
        raise ValueError(f"corrupt PNG: {len(raw)} bytes of image data, expected "
                         f"{height * (stride + 1)}")
    pixels = _unfilter(raw, height, stride, channels * 2)
    array = pixels.view(">u2").astype(np.uint16).reshape(height, width, channels)
    if channels == 1:
        return array[..., 0]
    if channels == 2:  # gray + alpha -> RGBA
        return np.concatenate([array[..., :1].repeat(3, axis=2), array[..., 1:]], axis=2)
    return array


def _png16_bytes(array: np.ndarray) -> bytes:
    """Encode uint16 (H, W), (H, W, 3) or (H, W, 4) as a 16-bit PNG (no row filters)."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour = {1: 0, 3: 2, 4: 6}[channels]
    raw = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(height, -1)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), raw], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (PNG_SIGNATURE
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


# --- arrays -------------------------------------------------------------------------------

def _from_pil(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


@contextlib.contextmanager
def _pixel_limit():
    """Pillow's own decompression-bomb check off (it warns above 89 MP and fails above
    179 MP, whatever our limit): callers check the declared size with _check_pixels
    before anything is decoded."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_depth(img: Image.Image) -> None:
    """Refuse what Pillow would silently read at a lower precision: float images, and TIFFs
    of more than 8 bits per sample other than 16-bit grayscale."""
    if img.mode in ("F", "I;32", "I;32B", "I;32L") or img.mode.startswith("F;"):
        raise ValueError(f"{img.format} image of mode {img.mode} (32-bit or float samples) is "
                         f"not supported; convert it to a 16-bit PNG")
    if img.format == "TIFF" and not img.mode.startswith("I;16"):
        bits = img.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        if max(bits) > 8:
            raise ValueError(f"{'/'.join(map(str, bits))}-bit TIFF would be read as {img.mode} "
                             f"(8 bits per sample); convert it to a 16-bit PNG")


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"image is {width}x{height}; it must be at least 1x1")
    if width * height > max_pixels:
        raise ValueError(f"image declares {width}x{height} = {width * height / 1e6:.0f} MP, "
                         f"more than the limit of {max_pixels / 1e6:.0f} MP (raise it with "
                         f"--max-pixels / max_pixels= if the file is genuine)")


def image_size(path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(H, W) from the file's header, without decoding; ValueError naming the file if it
    is not a readable image or declares more than max_pixels pixels."""
    path = Path(path)
    try:
        with _pixel_limit(), Image.open(path) as img:
            width, height = img.size
        _check_pixels(path, width, height, max_pixels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    return height, width


def read_array(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as stored: (H, W), (H, W, 3) or (H, W, 4), uint8 or uint16.
    Raises ValueError naming the file for anything unreadable, truncated or empty, or
    declaring more than max_pixels pixels (checked before decoding)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:8] == PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            _check_pixels(path, width, height, max_pixels)
        if data[:8] == PNG_SIGNATURE and len(data) >= 25 and data[24] == 16:
            array = _read_png16(data)
        else:
            with _pixel_limit(), Image.open(io.BytesIO(data)) as img:
                _check_pixels(path, *img.size, max_pixels)
                _check_depth(img)
                img.load()
                array = _from_pil(ImageOps.exif_transpose(img))  # upright, as displayed
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e
    if array.ndim < 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{path}: image is {array.shape[:2]}; it must be at least 1x1")
    return np.ascontiguousarray(array)


def write_array(array: np.ndarray, path, **save_options) -> None:
    """Write (H, W), (H, W, 3) or (H, W, 4) uint8/uint16 atomically, format from the suffix;
    save_options go to Pillow (quality, qtables). uint16 stays 16-bit in PNG and in
    grayscale TIFF; 16-bit colour TIFF is refused; 8-bit-only formats (JPEG, WebP, BMP) get
    it rounded to 8 bits. JPEG cannot store an alpha channel: a ValueError."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"write_array: expected (H, W[, 3|4]) uint8 or uint16; got "
                         f"{array.shape} {array.dtype}")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg") and array.ndim == 3 and array.shape[2] == 4:
        raise ValueError(f"{path}: JPEG cannot store an alpha channel (write PNG instead)")
    if array.dtype == np.uint16 and suffix == ".png":
        data = _png16_bytes(array)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
    elif array.dtype == np.uint16 and suffix in (".tif", ".tiff"):
        if array.ndim == 3:
            raise ValueError(f"{path}: Pillow cannot write 16-bit colour TIFF; write PNG "
                             f"(16-bit kept) instead")

        def write(tmp):  # 16-bit grayscale TIFF: Pillow's I;16 mode
            Image.fromarray(array).save(tmp, format="TIFF", **save_options)
    else:
        if array.dtype == np.uint16:  # JPEG, WebP, BMP: 8 bits per sample at most
            array = np.round(array / 257.0).astype(np.uint8)

        def write(tmp):
            Image.fromarray(array).save(tmp, format=Image.registered_extensions().get(suffix),
                                        **save_options)
    atomic_write(path, write)


# --- tensors ------------------------------------------------------------------------------

def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8/uint16 -> (1, C, H, W) float32 in [0, 1] (C = 1, 3 or 4)."""
    peak = 65535.0 if array.dtype == np.uint16 else 255.0
    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) / peak)
    t = t[..., None] if t.dim() == 2 else t
    return t.permute(2, 0, 1)[None].contiguous()


def read_image(path) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 RGB in [0, 1] (gray promoted, alpha dropped)."""
    t = array_to_tensor(read_array(path))
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t[:, :3].contiguous()


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits, as an image stored on disk would be."""
    return (x.clamp(0, 1) * 255).round() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded."""
    return (x[0].detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(x: torch.Tensor, path) -> None:
    """Write (1, 3, H, W) in [0, 1] as 8-bit RGB, atomically (temporary file, then rename)."""
    write_array(to_uint8(x), path)
