"""Generation and generative evaluation with our models (``tools/generate.py``, ``tools/evaluate.py``).

* :mod:`.engine`: cached (megatron-core ``StaticInferenceContext``) and uncached decoding, sampling;
* :mod:`.prompts`: (image files, prompt) -> model inputs laid out as in training;
* :mod:`.loading`: a checkpoint's config, tokenizer and model at any TP;
* :mod:`.evaluation`: exact-match accuracy per question type + teacher-forced loss/accuracy;
* :mod:`.cli`: the two command lines.
"""

from megatron_vlm.inference.engine import SamplingParams, generate

__all__ = ["SamplingParams", "generate"]
