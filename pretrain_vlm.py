"""Pretrain a vision-language model on megatron-core.

    mpirun -np 8 python pretrain_vlm.py --config examples/configs/X.yaml [Megatron-style flags]
    torchrun --nproc-per-node 8 pretrain_vlm.py --config ...
    srun python pretrain_vlm.py --config ...

Flags override the YAML file; ``--set section.key=value`` overrides anything. See README.md.
"""

import sys


def main(argv=None) -> int:
    from megatron_vlm.quiet import silence_known_warnings

    silence_known_warnings()
    from megatron_vlm.training.cli import run

    return run(argv)


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    sys.exit(main())
