"""The DALI graphs of the data layer and the glue around them.

``image_pipeline``: ``fn.readers.webdataset`` (this data-parallel rank's slice: ``shard_id=dp_rank,
num_shards=dp_size``) -> decode the centre square (``"cpu"`` without CUDA, ``"mixed"`` with it)
-> resize to ``image_size`` x ``image_size`` (equivalent to: shorter side to ``image_size``, centre
crop) -> normalise with mean/std (given on the 0..1 scale, applied to 0..255 pixels) -> float32
CHW. Outputs: images ``[b, 3, image_size, image_size]`` and the raw json bytes of each sample.
With ``ImageSpec.max_tiles > 1`` (Mllama tiling, :mod:`megatron_vlm.data.tiling`) it decodes the
whole image, resizes it to its tile grid's canvas, pads, normalises and splits it: outputs tiles
``[b, max_tiles, 3, S, S]``, the grid ``[b, 2]`` (tiles down, across) and the json bytes.

``decode_images``: the same preprocessing for image files given as bytes (generation).

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
    max_tiles: int = 1  # > 1: Mllama tiling (megatron_vlm/data/tiling.py), training shards only


def default_device_id() -> int | None:
    """The current CUDA device (mixed decode) or None (CPU-only pipeline)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _pipeline_kwargs(batch_size: int, num_threads: int, device_id: int | None, seed: int,
                     checkpoint: bytes | None) -> dict:
    return dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=checkpoint)


def _preprocess(encoded, image: ImageSpec, decode_device: str):
    """Encoded images -> normalised float32 CHW ``[3, S, S]`` (the graph every image of the project
    goes through: training, evaluation, generation)."""
    # centre square of side min(H, W), decoded as a region of interest, then resized to S x S:
    # the same pixels as "resize the shorter side to S, centre crop S x S", with less decoding
    height_width = fn.peek_image_shape(encoded, dtype=types.FLOAT)[0:2]
    side = fn.reductions.min(height_width)
    images = fn.decoders.image_crop(encoded, device=decode_device, output_type=types.RGB,
                                    crop_w=side, crop_h=side, crop_pos_x=0.5, crop_pos_y=0.5)
    size = image.image_size
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in image.mean], std=[255.0 * s for s in image.std])


@pipeline_def
def _image_graph(reader: ReaderSpec, image: ImageSpec, decode_device: str):
    encoded, meta = reader.read()
    if image.max_tiles > 1:
        from megatron_vlm.data.tiling import dali_tiles

        tiles, grid = dali_tiles(encoded, decode_device, image.image_size, image.max_tiles, image.mean, image.std)
        return tiles, grid, meta
    return _preprocess(encoded, image, decode_device), meta


@pipeline_def
def _encoded_graph(image: ImageSpec, decode_device: str, source):
    return _preprocess(fn.external_source(source=source, batch=True, dtype=types.UINT8), image, decode_device)


def decode_images(encoded: list[bytes], image: ImageSpec, num_threads: int = 1,
                  device_id: int | None = None) -> torch.Tensor:
    """Encoded image files (bytes) -> ``[n, 3, S, S]`` float32, exactly as training preprocesses its
    shards (one DALI batch; decoding errors are DALI's: check files before)."""
    batch = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
    pipe = _encoded_graph(image, "cpu" if device_id is None else "mixed", lambda: batch,
                          batch_size=len(batch), num_threads=num_threads, device_id=device_id,
                          prefetch_queue_depth=1)
    pipe.build()
    (images,) = pipe.run()
    out = to_torch(images)
    del pipe
    return out


@pipeline_def
def _reader_graph(reader: ReaderSpec):
    _, meta = reader.read()
    return meta


def image_pipeline(reader: ReaderSpec, image: ImageSpec, batch_size: int, num_threads: int,
                   device_id: int | None, checkpoint: bytes | None = None):
    """A built image pipeline; ``run()`` -> (images TensorList [b, 3, S, S] float32, json TensorList),
    or (tiles [b, T, 3, S, S], grid [b, 2] int64, json) with ``image.max_tiles = T > 1``."""
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
