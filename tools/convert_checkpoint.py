"""Checkpoint conversion Megatron <-> HuggingFace.

    python tools/convert_checkpoint.py import-hf --hf-path HF_DIR --save MCORE_DIR [--tensor-model-parallel-size 2]
    python tools/convert_checkpoint.py export-hf --load MCORE_DIR --hf-path HF_DIR [--tokenizer-path TOK_DIR]
    python tools/convert_checkpoint.py verify    --hf-path HF_DIR --load MCORE_DIR [--tensor-model-parallel-size 2]

See ``megatron_vlm/conversion/cli.py`` (flags) and ``megatron_vlm/conversion/__init__.py`` (families).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_vlm.quiet import silence_known_warnings

    silence_known_warnings()
    from megatron_vlm.conversion.cli import main as cli_main

    try:
        return cli_main(argv)
    finally:
        from megatron_vlm import runtime

        runtime.shutdown()


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    sys.exit(main())
