"""Resumable data-parallel loader: webdataset shards -> DALI -> :class:`VLMBatch` micro batches.

Order and epochs

* Each epoch runs a fresh DALI pipeline. Its input is the list of shards (``*.tar``), permuted per
  epoch with ``(seed, epoch)`` when ``shuffle`` (stored order otherwise), concatenated; DALI's
  webdataset reader gives data-parallel rank ``r`` the ``r``-th of ``dp_size`` contiguous slices
  (``shard_id=dp_rank, num_shards=dp_size``) and shuffles inside it through a buffer of
  ``initial_fill`` samples, seeded from ``(seed, epoch)``. Only the DP rank selects data: TP/PP
  peers of one DP rank build identical pipelines and get identical batches.
* Every rank yields ``batches_per_epoch = (num_samples // dp_size) // micro_batch_size`` batches
  per epoch, the same number on all ranks so that they stay in lockstep. What remains of a rank's
  slice (less than one batch, plus at most one sample where slices differ in size) is dropped for
  that epoch (DALI's ``last_batch_policy=DROP`` behaviour); the shard permutation and the shuffle
  make it different samples each epoch. No sample is repeated within an epoch and the ranks' slices
  are disjoint.

Resume: ``state_dict() == {"epoch": e, "samples_consumed": n}`` with ``n`` the samples consumed in
epoch ``e`` by all DP ranks together (the same on every rank). ``load_state_dict`` repositions
exactly: a reader-only DALI pipeline (no decoding, cheap) advances ``n / dp_size`` samples and its
reader state is transplanted into the image pipeline's checkpoint. Loading with a different
``dp_size`` rounds ``n`` down to a whole batch per rank; that epoch's remainder is then not exact.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from megatron_vlm.config import Config, ModelConfig, VisionConfig
from megatron_vlm.data.batch import VLMBatch
from megatron_vlm.data.dali_pipeline import (ImageSpec, ReaderSpec, batch_images, default_device_id,
                                             image_pipeline, json_records, reader_pipeline,
                                             transplant_reader_state)
from megatron_vlm.data.samples import SequenceBuilder
from megatron_vlm.data.shards import list_shards
from megatron_vlm.data.tokenizer import Tokenizer

AUTO = "auto"
TRAIN_SPLIT, VAL_SPLIT, TOKENIZER_DIR = "train", "val", "tokenizer"


def data_parallel_rank_and_size() -> tuple[int, int]:
    """(dp_rank, dp_size) from megatron's ``parallel_state`` when initialised, else (0, 1)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return 0, 1


def image_spec(vision: VisionConfig) -> ImageSpec:
    return ImageSpec(vision.image_size, tuple(vision.image_mean), tuple(vision.image_std), vision.max_tiles)


def model_images(model: ModelConfig) -> ImageSpec | tuple[ImageSpec, ...]:
    """What the model's images need: one encoder's ImageSpec, or a tuple of one per encoder in
    ``model.vision`` order (several encoders: the batch's ``images`` is then a tuple too)."""
    if model.multi_encoder:
        return tuple(image_spec(v) for v in model.vision)
    return image_spec(model.vision[0])


class DaliLoader:
    """Micro batches of one data-parallel rank from a folder of shards (see the module docstring)."""

    def __init__(self, shard_dir: str | os.PathLike, builder: SequenceBuilder,
                 image: ImageSpec | tuple[ImageSpec, ...],
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234,
                 shuffle: bool = True, num_threads: int = 2, device_id: int | None | str = AUTO,
                 initial_fill: int = 1024):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or num_threads < 1 or initial_fill < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}, num_threads={num_threads}, "
                             f"initial_fill={initial_fill}: each must be >= 1")
        self.shard_dir = Path(shard_dir)
        self.shards = list_shards(shard_dir)
        self.builder, self.image = builder, image
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.num_threads = seed, shuffle, num_threads
        self.initial_fill = initial_fill
        self.device_id = default_device_id() if device_id == AUTO else device_id
        self.num_samples = sum(s.num_samples for s in self.shards)
        self.batches_per_epoch = (self.num_samples // dp_size) // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.shard_dir}: {self.num_samples} samples cannot give each of {dp_size} "
                             f"data-parallel rank(s) one batch of {micro_batch_size}")
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_keys: list[str] = []  # shard keys of the samples in the last batch
        self._pipe = None

    # ---- order ----------------------------------------------------------------------------------
    def reader_spec(self, epoch: int) -> ReaderSpec:
        """The reader arguments of ``epoch`` (identical on all ranks but for ``shard_id``)."""
        order = np.arange(len(self.shards))
        reader_seed = self.seed
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(order)
            reader_seed = int(rng.integers(0, 2**31 - 1))
        return ReaderSpec(paths=tuple(str(self.shards[i].tar) for i in order),
                          index_paths=tuple(str(self.shards[i].index) for i in order),
                          shard_id=self.dp_rank, num_shards=self.dp_size, shuffle=self.shuffle,
                          seed=reader_seed, initial_fill=self.initial_fill)

    def _open(self) -> None:
        """Build this epoch's pipeline positioned after ``batch_in_epoch`` batches."""
        spec = self.reader_spec(self.epoch)
        args = (spec, self.image, self.micro_batch_size, self.num_threads, self.device_id)
        checkpoint = None
        if self.batch_in_epoch:
            skipper = reader_pipeline(spec, self.micro_batch_size, self.num_threads)
            for _ in range(self.batch_in_epoch):
                skipper.run()
            checkpoint = transplant_reader_state(image_pipeline(*args).checkpoint(), skipper.checkpoint())
            del skipper
        self._pipe = image_pipeline(*args, checkpoint=checkpoint)

    # ---- iteration ------------------------------------------------------------------------------
    def next_batch(self) -> VLMBatch:
        """The next micro batch: tokens etc. [micro_batch_size, seq_length], images [b, 1, 3, S, S]
        (several encoders: a tuple of one such tensor per encoder; tiled: [b, 1, T, 3, S, S] with
        aspect-ratio ids and tile masks), router_weights [b, E] with the data router."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._pipe = self.epoch + 1, 0, None
        if self._pipe is None:
            self._open()
        *outputs, meta = self._pipe.run()
        self.batch_in_epoch += 1
        records = json_records(meta)
        self.last_keys = [r.get("key", "") for r in records]
        images, grid = batch_images(outputs, self.image)  # grid: tiled, (tiles down, across) per image
        return self.builder.collate(records, images, grid)

    def __iter__(self):
        return self

    def __next__(self) -> VLMBatch:
        return self.next_batch()

    def eval_batches(self, num_micro_batches: int, eval_iters: int | None = None) -> list[list[VLMBatch]]:
        """``eval_iters`` lists of ``num_micro_batches`` micro batches from the start of the split
        (the same ones on every call), capped at one pass over it; ``None`` = one full pass."""
        iters = self.batches_per_epoch // num_micro_batches
        if eval_iters is not None:
            iters = min(iters, eval_iters)
        if iters < 1:
            raise ValueError(f"{self.shard_dir}: {self.batches_per_epoch} batches per rank cannot fill one "
                             f"evaluation step of {num_micro_batches} micro batches")
        self.load_state_dict({"epoch": 0, "samples_consumed": 0})
        out = [[self.next_batch() for _ in range(num_micro_batches)] for _ in range(iters)]
        self._pipe = None  # frees the pipeline's threads and buffers until the next evaluation
        return out

    # ---- resume ---------------------------------------------------------------------------------
    @property
    def samples_per_step(self) -> int:
        """Samples one micro batch step consumes over all DP ranks."""
        return self.micro_batch_size * self.dp_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_consumed": self.batch_in_epoch * self.samples_per_step}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        batches, rest = divmod(consumed, self.samples_per_step)
        if epoch < 0 or consumed < 0 or batches > self.batches_per_epoch:
            raise ValueError(f"data state {state}: needs epoch >= 0 and 0 <= samples_consumed <= "
                             f"{self.batches_per_epoch * self.samples_per_step} (one epoch)")
        if rest:
            warnings.warn(f"data state {state}: samples_consumed is not a multiple of micro_batch_size x "
                          f"dp_size = {self.samples_per_step} (data-parallel size changed?); resuming "
                          f"after {batches} batch(es) per rank")
        self.epoch, self.batch_in_epoch, self._pipe = epoch, batches, None


# ------------------------------------------------------------------------------------------------
# From a Config
# ------------------------------------------------------------------------------------------------

def load_tokenizer(cfg: Config, tokenizer_path: str | os.PathLike | None = None) -> Tokenizer:
    """``tokenizer_path``, else ``cfg.data.tokenizer_path``, else ``<data_path>/tokenizer``."""
    path = tokenizer_path or cfg.data.tokenizer_path or Path(cfg.data.data_path) / TOKENIZER_DIR
    return Tokenizer.from_pretrained(path)


def build_loader(cfg: Config, split: str, tokenizer: Tokenizer, dp_rank: int | None = None,
                 dp_size: int | None = None) -> DaliLoader:
    """The loader of ``<data_path>/<split>``: shuffled for ``train``, stored order otherwise."""
    if dp_rank is None or dp_size is None:
        dp_rank, dp_size = data_parallel_rank_and_size()
    if cfg.data.images_per_sample != 1:
        raise ValueError(f"data.images_per_sample={cfg.data.images_per_sample}: the shard loader "
                         "supports one image per sample")
    vocab = cfg.model.language.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"model.language.vocab_size={vocab}: smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids")
    return DaliLoader(Path(cfg.data.data_path) / split, SequenceBuilder.from_model_config(tokenizer, cfg.model),
                      model_images(cfg.model), cfg.training.micro_batch_size, dp_rank, dp_size,
                      seed=cfg.training.seed, shuffle=split == TRAIN_SPLIT, num_threads=cfg.data.num_threads)


def build_loaders(cfg: Config, tokenizer_path: str | os.PathLike | None = None, dp_rank: int | None = None,
                  dp_size: int | None = None) -> tuple[DaliLoader, DaliLoader]:
    """(train loader, val loader) of this data-parallel rank (default: from ``parallel_state``)."""
    if cfg.data.data_path is None:
        raise ValueError("data.data_path: not set (a folder with train/ and val/ shards)")
    tokenizer = load_tokenizer(cfg, tokenizer_path)
    return (build_loader(cfg, TRAIN_SPLIT, tokenizer, dp_rank, dp_size),
            build_loader(cfg, VAL_SPLIT, tokenizer, dp_rank, dp_size))
