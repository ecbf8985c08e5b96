"""The DALI graphs of the data layer and the glue around them.

``image_pipeline``: ``fn.readers.webdataset`` (this data-parallel rank's slice: ``shard_id=dp_rank,
num_shards=dp_size``) -> decode the centre square (``"cpu"`` without CUDA, ``"mixed"`` with it)
-> resize to ``image_size`` x ``image_size`` (equivalent to: shorter side to ``image_size``, centre
crop) -> normalise with mean/std (given on the 0..1 scale, applied to 0..255 pixels) -> float32
CHW. Outputs: images ``[b, 3, image_size, image_size]`` and the raw json bytes of each sample.
Several encoders (a tuple of ImageSpecs, ``model.vision`` order): each image is decoded once and
resized / normalised per encoder in the same graph: one images output per encoder, then the json.
With ``ImageSpec.max_tiles > 1`` (Mllama tiling, :mod:`megatron_vlm.data.tiling`) it decodes the
whole image, resizes it to its tile grid's canvas, pads, normalises and splits it: outputs tiles
``[b, max_tiles, 3, S, S]``, the grid ``[b, 2]`` (tiles down, across) and the json bytes.

``decode_images``: the same preprocessing (one encoder, several, or tiles) for image files given
as bytes (generation); :func:`batch_images` turns either graph's image outputs into the batch's
``images`` (a tensor, or a tuple of one per encoder) and the tile grid.

``reader_pipeline``: the same reader alone. It advances the reader cheaply (no decoding) to resume
mid-epoch; :func:`transplant_reader_state` then moves its reader state into an image pipeline's
checkpoint (DALI restores a checkpoint only into a pipeline with exactly the same operators).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type
from nvidia.dali.tensors import TensorListGPU

READER = "reader"
IMAGE_EXTENSIONS = "jpg;jpeg;png"


@dataclass(frozen=True)
class ReaderSpec:
    """Arguments of ``fn.readers.webdataset`` for one epoch of one data-parallel rank."""
    paths: tuple[str, ...]
    index_paths: tuple[str, ...]
    shard_id: int
    num_shards: int
    shuffle: bool
    seed: int
    initial_fill: int = 1024

    def read(self):
        """(encoded images, json bytes) DataNodes."""
        return fn.readers.webdataset(
            name=READER, paths=list(self.paths), index_paths=list(self.index_paths),
            ext=[IMAGE_EXTENSIONS, "json"], shard_id=self.shard_id, num_shards=self.num_shards,
            random_shuffle=self.shuffle, initial_fill=self.initial_fill, seed=self.seed,
            stick_to_shard=True, pad_last_batch=False, missing_component_behavior="error")


@dataclass(frozen=True)
class ImageSpec:
    image_size: int
    mean: tuple[float, float, float]  # 0..1 scale
    std: tuple[float, float, float]
    max_tiles: int = 1  # > 1: Mllama tiling (megatron_vlm/data/tiling.py)


def as_specs(image) -> tuple[ImageSpec, ...]:
    """``image`` (one ImageSpec or several) as a tuple; tiles only with one encoder."""
    specs = (image,) if isinstance(image, ImageSpec) else tuple(image)
    if not specs:
        raise ValueError("no image spec: need one per vision encoder")
    if len(specs) > 1 and any(s.max_tiles > 1 for s in specs):
        raise ValueError(f"{len(specs)} encoders with max_tiles {[s.max_tiles for s in specs]}: "
                         "tiled (Mllama) images need exactly one encoder")
    return specs


def default_device_id() -> int | None:
    """The current CUDA device (mixed decode) or None (CPU-only pipeline)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _pipeline_kwargs(batch_size: int, num_threads: int, device_id: int | None, seed: int,
                     checkpoint: bytes | None) -> dict:
    return dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=checkpoint)


def _preprocess(encoded, specs: tuple[ImageSpec, ...], decode_device: str) -> list:
    """Encoded images -> per encoder normalised float32 CHW ``[3, S_e, S_e]`` (the graph every image
    of the project goes through: training, evaluation, generation). One decode for all encoders."""
    # centre square of side min(H, W), decoded as a region of interest, then resized to S x S:
    # the same pixels as "resize the shorter side to S, centre crop S x S", with less decoding
    height_width = fn.peek_image_shape(encoded, dtype=types.FLOAT)[0:2]
    side = fn.reductions.min(height_width)
    decoded = fn.decoders.image_crop(encoded, device=decode_device, output_type=types.RGB,
                                     crop_w=side, crop_h=side, crop_pos_x=0.5, crop_pos_y=0.5)
    out = []
    for image in specs:
        size = image.image_size
        images = fn.resize(decoded, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        out.append(fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[255.0 * m for m in image.mean],
                                            std=[255.0 * s for s in image.std]))
    return out


def _image_outputs(encoded, image, decode_device: str) -> list:
    """The image outputs of a graph: one per encoder, or (tiles, grid) when tiled."""
    specs = as_specs(image)
    if specs[0].max_tiles > 1:
        from megatron_vlm.data.tiling import dali_tiles

        s = specs[0]
        return list(dali_tiles(encoded, decode_device, s.image_size, s.max_tiles, s.mean, s.std))
    return _preprocess(encoded, specs, decode_device)


@pipeline_def
def _image_graph(reader: ReaderSpec, image, decode_device: str):
    encoded, meta = reader.read()
    return (*_image_outputs(encoded, image, decode_device), meta)


@pipeline_def
def _encoded_graph(image, decode_device: str, source):
    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return tuple(_image_outputs(encoded, image, decode_device))


def batch_images(outputs, image) -> tuple:
    """A graph's image outputs (the json excluded) -> ``(images, grid)``: images ``[b, 3, S, S]``
    (one encoder), a tuple of E such tensors (several, ``model.vision`` order) or tiles
    ``[b, T, 3, S, S]`` with grid ``[b, 2]`` (tiles down, across; None untiled)."""
    specs = as_specs(image)
    tensors = [to_torch(o) for o in outputs]
    if specs[0].max_tiles > 1:
        return tensors[0], tensors[1]
    return (tensors[0] if isinstance(image, ImageSpec) else tuple(tensors)), None


def decode_images(encoded: list[bytes], image, num_threads: int = 1,
                  device_id: int | None = None) -> tuple:
    """Encoded image files (bytes) -> ``(images, grid)`` of :func:`batch_images` (``images``
    ``[n, 3, S, S]`` float32, one per encoder, or tiles), exactly as training preprocesses its
    shards (one DALI batch; decoding errors are DALI's: check files before)."""
    batch = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
    pipe = _encoded_graph(image, "cpu" if device_id is None else "mixed", lambda: batch,
                          batch_size=len(batch), num_threads=num_threads, device_id=device_id,
                          prefetch_queue_depth=1)
    pipe.build()
    out = batch_images(pipe.run(), image)
    del pipe
    return out


@pipeline_def
def _reader_graph(reader: ReaderSpec):
    _, meta = reader.read()
    return meta


def image_pipeline(reader: ReaderSpec, image, batch_size: int, num_threads: int,
                   device_id: int | None, checkpoint: bytes | None = None):
    """A built image pipeline; ``run()`` -> (images TensorList [b, 3, S, S] float32, json TensorList),
    with several ImageSpecs (images of encoder 0, ..., of encoder E-1, json), or (tiles
    [b, T, 3, S, S], grid [b, 2] int64, json) with ``image.max_tiles = T > 1``; see
    :func:`batch_images`."""
    pipe = _image_graph(reader, image, "cpu" if device_id is None else "mixed",
                        **_pipeline_kwargs(batch_size, num_threads, device_id, reader.seed, checkpoint))
    pipe.build()
    return pipe


def reader_pipeline(reader: ReaderSpec, batch_size: int, num_threads: int):
    """A built reader-only pipeline (CPU); ``run()`` -> (json TensorList,)."""
    pipe = _reader_graph(reader, **_pipeline_kwargs(batch_size, num_threads, None, reader.seed, None))
    pipe.build()
    return pipe


# ------------------------------------------------------------------------------------------------
# Outputs -> Python / torch
# ------------------------------------------------------------------------------------------------

def to_torch(tensor_list) -> torch.Tensor:
    """Copy a uniform-shape DALI TensorList (CPU or GPU) into a new torch tensor on the same device."""
    dense = tensor_list.as_tensor()
    on_gpu = isinstance(tensor_list, TensorListGPU)
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype],
                      device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream() if on_gpu else None)
    return out


def json_records(tensor_list) -> list[dict]:
    """Decode a TensorList of json bytes (one per sample)."""
    return [json.loads(np.asarray(tensor_list[i]).tobytes()) for i in range(len(tensor_list))]


# ------------------------------------------------------------------------------------------------
# Checkpoint transplant (protobuf wire format of DALI's serialized checkpoint)
# ------------------------------------------------------------------------------------------------
# Checkpoint { repeated OpCheckpoint ops = 1 { string name = 1; bytes state = 2; }  ExternalCtx = 2 }

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, bytes]]:
    """(field number, payload) of a message whose fields are all length-delimited."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key & 7 != 2:
            raise ValueError("unexpected DALI checkpoint layout (DALI version change?)")
        size, i = _varint(buf, i)
        out.append((key >> 3, buf[i:i + size]))
        i += size
    return out


def _message(fields: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_encode_varint(num << 3 | 2) + _encode_varint(len(p)) + p for num, p in fields)


def _op_name(op_checkpoint: bytes) -> str:
    return dict(_fields(op_checkpoint)).get(1, b"").decode()


def transplant_reader_state(target: bytes, source: bytes, reader_name: str = READER) -> bytes:
    """``target`` (an image pipeline's checkpoint) with the reader state and iteration counters of
    ``source`` (a reader pipeline's checkpoint). The other operators of both graphs are stateless."""
    src = _fields(source)
    reader_state = [p for num, p in src if num == 1 and _op_name(p) == reader_name]
    if len(reader_state) != 1:
        raise ValueError(f"reader checkpoint has no operator {reader_name!r}")
    out = []
    for num, payload in _fields(target):
        if num == 1 and _op_name(payload) == reader_name:
            payload = reader_state[0]
        elif num == 1 and dict(_fields(payload)).get(2):
            raise ValueError(f"operator {_op_name(payload)!r} has state: a transplanted reader state "
                             "would not reproduce it")
        elif num != 1:
            payload = dict(src).get(num, payload)
        out.append((num, payload))
    return _message(out)
