"""Generative exact-match accuracy of a checkpoint on a dataset split, per question type, plus the
teacher-forced accuracy and loss on the same samples.

    python tools/evaluate.py --load CKPT [--data-path DIR] [--split val]

See ``megatron_vlm/inference/cli.py`` (flags) and ``megatron_vlm/inference/``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_vlm.quiet import silence_known_warnings

    silence_known_warnings()
    from megatron_vlm.inference.cli import evaluate_main

    return evaluate_main(argv)


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    sys.exit(main())
