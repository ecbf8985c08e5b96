"""megatron_vlm: vision-language model training on megatron-core.

Torch is pinned to 2.13.0. On this project's CPU machines `pip install torch==2.13.0` resolves to
the local CPU wheel; on GPU clusters install the CUDA build of the same version first, e.g.
`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130`, then this package.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_vlm",
    version="0.1.0",
    description="Vision-language model training on megatron-core (TP/PP/DP/EP, DALI, HF conversion)",
    packages=find_packages(include=["megatron_vlm", "megatron_vlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "nvidia-dali-cuda130==2.4.0",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6.0",
        "psutil>=5.9",
        "numpy>=1.26",
        "pillow>=10",
        "einops>=0.7",
        "tensorboard>=2.15",
        "mpi4py>=4.0",
        "openmpi>=5.0",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    },
)
