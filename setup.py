"""prfl: process reward feedback learning for Wan2.1 video DiTs, on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="prfl",
    version="0.1.0",
    description="Latent-space reward feedback learning (PRFL) and process-aware reward models for Wan2.1 video DiTs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "runners"]),
    # Lower bounds are the versions this project is tested with (see README, "Tested versions").
    install_requires=[
        "torch>=2.13",
        "deepspeed>=0.19",
        "diffusers>=0.42",
        "transformers>=5.0",
        "huggingface_hub>=2.0",
        "safetensors>=0.8",
        "tensorboard>=2.21",
        "pyyaml>=6.0",
        "triton>=3.9",
        "liger-kernel>=0.8",
        "peft>=0.21",
        "av>=18",
        "ftfy>=6.3",
        "tqdm>=4.70",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.11", "import-linter>=2.17"],  # matplotlib:
        # benchmark charts (smoke tests); import-linter: the layering contracts (.importlinter)
        "bench": ["matplotlib>=3.11"],
        "gpu": ["flash-attn>=2.7"],
    },
)
