"""Mllama tiling with GPU ("mixed") decoding (skipped without CUDA): the same grids, ids and masks
as the CPU pipeline and pixels within the processor-comparison tolerance (nvJPEG and the GPU
resize differ slightly from the CPU path)."""

import pytest
import torch

from megatron_vlm.data import dali_loader
from tests.unit.test_mllama_tiling import MEAN_ABS_TOL, SIZES, _mllama_cfg, tiled_data  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_mixed_decode_tiles_match_cpu(tiled_data):  # noqa: F811
    cfg = _mllama_cfg()
    cfg.data.data_path = str(tiled_data / "data")
    cfg.training.micro_batch_size = len(SIZES)
    cfg.model.language.seq_length = 16
    tok = dali_loader.load_tokenizer(cfg)
    batches = []
    for device_id in (None, torch.cuda.current_device()):
        loader = dali_loader.build_loader(cfg, "val", tok, 0, 1)
        loader.device_id = device_id
        batches.append(loader.next_batch().to("cpu"))
    cpu, gpu = batches
    assert torch.equal(cpu.aspect_ratio_ids, gpu.aspect_ratio_ids)
    assert torch.equal(cpu.aspect_ratio_mask, gpu.aspect_ratio_mask)
    for i in range(len(SIZES)):
        real = cpu.aspect_ratio_mask[i, 0]
        assert (gpu.images[i, 0, ~real] == 0).all()
        assert (gpu.images[i, 0, real] - cpu.images[i, 0, real]).abs().mean() <= MEAN_ABS_TOL, SIZES[i]
