"""Answer (image, prompt) pairs with a checkpoint of any arch (greedy by default, KV-cached).

    python tools/generate.py --load CKPT --image cat.jpg --prompt "what colour is the circle?"
    python tools/generate.py --load CKPT --input rows.jsonl --output answers.jsonl
    mpirun -np 2 python tools/generate.py --load CKPT ... --tensor-model-parallel-size 2

See ``megatron_vlm/inference/cli.py`` (flags) and ``megatron_vlm/inference/``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_vlm.quiet import silence_known_warnings

    silence_known_warnings()
    from megatron_vlm.inference.cli import generate_main

    return generate_main(argv)


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    sys.exit(main())
