"""What the training loop needs from the data layer: micro batches for this data-parallel rank,
validation batches, the tokenizer's vocab size / image token, and a resumable position.

``data.data_path``:
* a dataset folder with ``train/`` and ``val/`` webdataset shards (``tools/make_synthetic_dataset.py``
  or ``tools/prepare_data.py`` output) -> the DALI pipeline;
* ``mock`` -> deterministic random batches (like Megatron's ``--mock-data``), for smoke tests and
  benchmarks without data.

Several vision encoders: ``images`` of each batch is a tuple (one tensor per encoder) and, with
``model.fusion.router: data``, ``router_weights`` come from the samples' manifest records; those
are checked for every sample of both splits in :meth:`DataSpec.from_config`, before anything is
built. Every TP / PP rank of one DP rank builds the same batches (tuple fields included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron.core import parallel_state

from megatron_vlm.config import Config
from megatron_vlm.data.batch import VLMBatch

MOCK = "mock"


@dataclass
class DataSpec:
    data_path: str
    tokenizer_path: str | None
    tokenizer_vocab_size: int | None
    image_token_id: int | None

    @property
    def mock(self) -> bool:
        return self.data_path == MOCK

    @classmethod
    def from_config(cls, cfg: Config) -> "DataSpec":
        path = cfg.data.data_path
        if path is None:
            raise FileNotFoundError("--data-path is required: a dataset folder (train/, val/) or 'mock'")
        if path == MOCK:
            return cls(MOCK, None, None, None)
        root = Path(path)
        for split in ("train", "val"):
            if not (root / split).is_dir() or not any((root / split).glob("*.tar")):
                raise FileNotFoundError(f"--data-path {path}: no {split}/*.tar shards (build them with "
                                        "tools/make_synthetic_dataset.py or tools/prepare_data.py)")
        from megatron_vlm.data.shards import check_shards

        for split in ("train", "val"):
            check_shards(root / split)  # a truncated shard or index is named here, not by the reader
        from megatron_vlm.data.encoder_weights import check_split, router_encoders

        num_encoders = router_encoders(cfg.model)
        if num_encoders:  # the data router: every sample's weights (shard side files; no image read)
            for split in ("train", "val"):
                check_split(root / split, num_encoders)
        tok_path = cfg.data.tokenizer_path if cfg.data.tokenizer_path is not None else str(root / "tokenizer")
        if not (Path(tok_path) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--tokenizer-path {tok_path}: no tokenizer.json")
        from megatron_vlm.data.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(tok_path)
        return cls(path, tok_path, tok.vocab_size, tok.image_token_id)


class TrainingData:
    """Per-rank data for the trainer. Only the data-parallel rank selects samples: TP/PP peers of
    one DP rank see identical batches."""

    def __init__(self, cfg: Config, spec: DataSpec):
        self.cfg, self.spec = cfg, spec
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.image_token_id = cfg.model.image_token_id
        self.consumed = 0  # global samples consumed (mock)
        if not spec.mock:
            from megatron_vlm.data.dali_loader import build_loaders

            self.train_loader, self.val_loader = build_loaders(cfg, spec.tokenizer_path,
                                                               self.dp_rank, self.dp_size)

    # ---- training ----------------------------------------------------------------------------
    def next_train(self, num_micro_batches: int) -> list[VLMBatch]:
        mbs = self.cfg.training.micro_batch_size
        if self.spec.mock:
            return [self._mock(self.consumed_for_rank(i), mbs) for i in self._advance(num_micro_batches)]
        return [self.train_loader.next_batch() for _ in range(num_micro_batches)]

    def val_batches(self, num_micro_batches: int, eval_iters: int) -> list[list[VLMBatch]]:
        mbs = self.cfg.training.micro_batch_size
        if self.spec.mock:
            base = 10**9  # a disjoint sample range
            return [[self._mock(base + (it * num_micro_batches + i) * mbs * self.dp_size
                                + self.dp_rank * mbs, mbs) for i in range(num_micro_batches)]
                    for it in range(eval_iters)]
        return self.val_loader.eval_batches(num_micro_batches, eval_iters)

    def state_dict(self) -> dict:
        if self.spec.mock:
            return {"consumed": self.consumed}
        return {"train": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.spec.mock:
            self.consumed = state["consumed"]
        else:
            self.train_loader.load_state_dict(state["train"])

    # ---- mock data ---------------------------------------------------------------------------
    def _advance(self, num_micro_batches: int):
        start = self.consumed
        self.consumed += num_micro_batches * self.cfg.training.micro_batch_size * self.dp_size
        return [(start, i) for i in range(num_micro_batches)]

    def consumed_for_rank(self, item) -> int:
        start, i = item
        mbs = self.cfg.training.micro_batch_size
        return start + (i * self.dp_size + self.dp_rank) * mbs

    def _mock(self, first_sample: int, mbs: int) -> VLMBatch:
        from megatron_vlm.archs import get_arch
        from megatron_vlm.data.mock import random_batch

        return random_batch(self.cfg.model, mbs, seed=self.cfg.training.seed * 7919 + first_sample,
                            image_token_id=self.image_token_id, images_per_sample=self.cfg.data.images_per_sample,
                            layout=get_arch(self.cfg.model.arch).token_layout)
