"""Real-format images through the shard builder and the DALI loader.

Every file is made with PIL from one deterministic photo-like picture (gradients, shapes, mild
texture) in the formats datasets hold: baseline / progressive / CMYK / grayscale / EXIF-rotated JPEG,
gray / RGBA / palette (with and without a transparent colour) / 16-bit gray and RGB PNG, WEBP with
and without alpha, and one file for every other mode PIL opens (1, LA, PA, I, I;16B, F, LAB, YCbCr,
CMYK TIFF, 16-bit PPM). The reference of each is the same upright RGB picture computed here with
numpy (8-bit values, alpha composited onto white as the builder documents): every image out of the
DALI loader must be within 4/255 mean absolute difference of it, at native size (image_size = the
short side, so the pipeline's resize is the identity) and after a 2x downscale (PIL reference:
centre crop + antialiased bilinear resize, as the pipeline resizes).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from megatron_vlm.config import Config
from megatron_vlm.data import dali_loader, shards
from megatron_vlm.data.tokenizer import train_bpe

H, W = 48, 64  # upright size: landscape, short side 48
TOLERANCE = 4.0  # mean |ours - reference| on the 0..255 scale


def photo(h: int = H, w: int = W) -> np.ndarray:
    """A deterministic photo-like RGB picture [h, w, 3] uint8: smooth gradients, a disc, a bar,
    low-amplitude texture, and an asymmetric layout (so rotations and flips are visible)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 180 * x / w, 60 + 150 * y / h, 200 - 120 * (x + y) / (w + h)], -1)
    img += 12 * np.sin(x / 3.0)[..., None] * np.cos(y / 5.0)[..., None]
    disc = (x - 0.7 * w) ** 2 + (y - 0.35 * h) ** 2 < (0.18 * h) ** 2
    img[disc] = (230, 40, 50)
    img[int(0.7 * h):int(0.82 * h), 4:int(0.4 * w)] = (20, 30, 160)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (PIL's L conversion), float."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _alpha(h: int = H, w: int = W) -> np.ndarray:
    """Alpha ramp left to right: transparent (0) to opaque (255), uint8."""
    return np.broadcast_to(np.linspace(0, 255, w).round().astype(np.uint8), (h, w)).copy()


def _on_white(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a[..., None].astype(np.float64) / 255
    return rgb * a + 255 * (1 - a)


def _png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (PIL writes 16-bit only for gray): color type 0 gray, 2 RGB."""
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# EXIF orientation o: the stored pixels are the upright ones under the inverse of what a viewer
# applies (o=6: the viewer turns 90 degrees clockwise, so the stored picture is turned back)
_STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def make_images(root) -> dict[str, np.ndarray]:
    """Write the test files under ``root``; {file name: upright reference RGB float [H, W, 3]}."""
    rgb = photo()
    im = Image.fromarray(rgb)
    gray8 = np.clip(np.rint(_gray(rgb.astype(np.float64))), 0, 255).astype(np.uint8)
    g3 = np.repeat(gray8[..., None], 3, -1).astype(np.float64)
    a = _alpha()
    refs: dict[str, np.ndarray] = {}

    def jpeg_ref(path) -> np.ndarray:  # a JPEG's own pixels (its compression is part of the data)
        with Image.open(path) as j:
            return np.asarray(j.convert("RGB"), dtype=np.float64)

    im.save(root / "baseline.jpg", quality=90)
    refs["baseline.jpg"] = jpeg_ref(root / "baseline.jpg")
    im.save(root / "progressive.jpg", quality=90, progressive=True)
    refs["progressive.jpg"] = jpeg_ref(root / "progressive.jpg")
    Image.fromarray(gray8).save(root / "gray.jpg", quality=90)
    refs["gray.jpg"] = jpeg_ref(root / "gray.jpg")
    im.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    with Image.open(root / "cmyk.jpg") as j:
        assert j.mode == "CMYK"
    refs["cmyk.jpg"] = rgb.astype(np.float64)
    for o, method in _STORE.items():
        exif = Image.Exif()
        exif[shards.ORIENTATION_TAG] = o
        im.transpose(method).save(root / f"exif{o}.jpg", quality=100, subsampling=0, exif=exif)
        refs[f"exif{o}.jpg"] = rgb.astype(np.float64)
    exif = Image.Exif()
    exif[shards.ORIENTATION_TAG] = 6
    im.transpose(_STORE[6]).save(root / "exif6.png", exif=exif)
    refs["exif6.png"] = rgb.astype(np.float64)

    Image.fromarray(gray8).save(root / "gray.png")
    refs["gray.png"] = g3
    Image.fromarray(np.dstack([rgb, a])).save(root / "rgba.png")
    refs["rgba.png"] = _on_white(rgb, a)
    pal = im.quantize(64, dither=Image.Dither.NONE)
    pal.save(root / "palette.png")
    refs["palette.png"] = np.asarray(pal.convert("RGB"), dtype=np.float64)
    index = np.asarray(pal)
    clear = int(index[H // 2, 2])  # one palette entry is fully transparent (tRNS)
    pal.save(root / "palette_trns.png", transparency=clear)
    refs["palette_trns.png"] = np.where((index == clear)[..., None], 255.0, refs["palette.png"])
    gray16 = gray8.astype(np.uint16) * 257 + (np.arange(W) % 200).astype(np.uint16)  # low byte varies
    Image.fromarray(gray16).save(root / "gray16.png")
    with Image.open(root / "gray16.png") as j:
        assert j.mode == "I;16"
    refs["gray16.png"] = np.repeat((gray16 / 257.0)[..., None], 3, -1)
    (root / "rgb16.png").write_bytes(_png16(rgb.astype(np.uint16) * 257 + 100, 2))
    refs["rgb16.png"] = rgb.astype(np.float64)
    im.save(root / "lossy.webp", quality=90)
    refs["lossy.webp"] = jpeg_ref(root / "lossy.webp")
    Image.fromarray(np.dstack([rgb, a])).save(root / "alpha.webp", lossless=True)
    refs["alpha.webp"] = _on_white(rgb, a)

    # every other mode PIL opens from a file
    bits = gray8 > 128
    Image.fromarray(bits).save(root / "mode_1.png")
    refs["mode_1.png"] = np.repeat(bits[..., None] * 255.0, 3, -1)
    Image.fromarray(np.dstack([gray8, a])).save(root / "mode_la.png")
    refs["mode_la.png"] = _on_white(g3, a)
    pa = pal.convert("PA")
    pa.putalpha(Image.fromarray(a))
    pa.save(root / "mode_pa.tiff")
    with Image.open(root / "mode_pa.tiff") as j:
        assert j.mode == "PA"
    refs["mode_pa.tiff"] = _on_white(refs["palette.png"], a)
    Image.fromarray(gray8.astype(np.int32) * 8421504).save(root / "mode_i32.tiff")  # 32-bit signed
    refs["mode_i32.tiff"] = g3 * (8421504 * 255 / (2 ** 31 - 1))  # full scale: 2^31 - 1
    Image.fromarray(gray16).save(root / "mode_i16.ppm")
    with Image.open(root / "mode_i16.ppm") as j:
        assert j.mode == "I"
    refs["mode_i16.ppm"] = refs["gray16.png"]
    Image.frombytes("I;16B", (W, H), gray16.astype(">u2").tobytes()).save(root / "mode_i16b.tiff")
    refs["mode_i16b.tiff"] = refs["gray16.png"]
    Image.fromarray((gray8 / 255.0).astype(np.float32)).save(root / "mode_f01.tiff")
    refs["mode_f01.tiff"] = g3
    Image.fromarray(gray8.astype(np.float32)).save(root / "mode_f255.tiff")
    refs["mode_f255.tiff"] = g3
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    ImageCms.applyTransform(im, to_lab).save(root / "mode_lab.tiff")
    refs["mode_lab.tiff"] = rgb.astype(np.float64)
    im.convert("YCbCr").save(root / "mode_ycbcr.tiff")
    refs["mode_ycbcr.tiff"] = rgb.astype(np.float64)
    im.convert("CMYK").save(root / "mode_cmyk.tiff")
    refs["mode_cmyk.tiff"] = rgb.astype(np.float64)
    for name in refs:
        with Image.open(root / name) as j:
            j.load()  # each file opens in PIL
    return refs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_images")
    (root / "raw").mkdir()
    refs = make_images(root / "raw")
    names = sorted(refs)
    entries = [shards.ManifestEntry(n, {"image": n, "text": "x"}) for n in names]
    report = shards.build_shards(entries, root / "data" / "val", root / "raw", shard_size=len(names))
    assert report.skipped == [] and report.written == len(names)
    train_bpe(["x y z"], 300, root / "data" / "tokenizer")
    return root, names, refs


def _loader_images(root, batch: int, image_size: int) -> np.ndarray:
    """All images of the val split out of the DALI loader, back on the 0..255 scale [n, S, S, 3]."""
    cfg = Config()
    cfg.data.data_path = str(root / "data")
    cfg.training.micro_batch_size = batch
    v = cfg.model.vision_encoder
    v.image_size, v.patch_size = image_size, 8
    cfg.model.language.seq_length = 4 * (image_size // 8) ** 2
    loader = dali_loader.build_loader(cfg, "val", dali_loader.load_tokenizer(cfg), 0, 1)
    images = loader.next_batch().images[:, 0].numpy()  # [n, 3, S, S], normalised
    mean, std = np.array(v.image_mean)[:, None, None], np.array(v.image_std)[:, None, None]
    return ((images * std + mean) * 255.0).transpose(0, 2, 3, 1)


def _centre_square(ref: np.ndarray, size: int | None = None) -> np.ndarray:
    side = min(ref.shape[:2])
    top, left = (ref.shape[0] - side) // 2, (ref.shape[1] - side) // 2
    crop = ref[top:top + side, left:left + side]
    if size is None or size == side:
        return crop
    planes = [np.asarray(Image.fromarray(crop[..., c].astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in range(3)]
    return np.stack(planes, -1)


def test_builder_writes_upright_8bit_rgb_for_every_mode(dataset):
    """The stored JPEGs (decoded by PIL) against the references: catches 16-bit/float images
    clipped to white, EXIF rotation ignored, alpha dropped instead of composited."""
    root, names, refs = dataset
    (info,) = shards.list_shards(root / "data" / "val")
    errors = {}
    for _, jpeg, meta in shards.read_shard(info.tar):
        with Image.open(io.BytesIO(jpeg)) as j:
            assert j.mode in ("RGB", "L") and j.getexif().get(shards.ORIENTATION_TAG, 1) == 1
            got = np.asarray(j.convert("RGB"), dtype=np.float64)
        errors[meta["image"]] = float(np.abs(got - refs[meta["image"]]).mean())
    print({k: round(v, 2) for k, v in errors.items()})
    assert set(errors) == set(names)
    assert {k: v for k, v in errors.items() if v > TOLERANCE} == {}


def test_dali_loader_matches_pil_reference_of_upright_pixels(dataset):
    root, names, refs = dataset
    for size in (H, H // 2):  # native size (identity resize), then a 2x downscale
        got = _loader_images(root, len(names), size)
        errors = {n: float(np.abs(got[i] - _centre_square(refs[n], size)).mean()) for i, n in enumerate(names)}
        print(size, {k: round(v, 2) for k, v in errors.items()})
        assert {k: v for k, v in errors.items() if v > TOLERANCE} == {}, size


def test_float_image_without_known_scale_is_skipped_and_reported(tmp_path):
    Image.fromarray(np.full((8, 8), 1000.0, np.float32)).save(tmp_path / "hdr.tiff")
    entries = [shards.ManifestEntry("m:1", {"image": "hdr.tiff", "text": "x"})]
    report = shards.build_shards(entries, tmp_path / "out", tmp_path, shard_size=1)
    assert report.written == 0 and "no known scale" in report.skipped[0]["reason"]
