"""Packaging for the `megatron` library (preference learning on a Megatron-style engine)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = (Path(__file__).parent / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="megatron-post-training",
    version="0.1.0",
    description="SFT, DPO, KTO and reward models at pretraining scale (TP/PP/ZeRO).",
    packages=find_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "dev": _requirements("requirements-dev.txt"),
        "eval": ["lm-eval>=0.4.5,<0.5"],
        "flash": ["flash-attn>=2.6"],
        "mpi": ["mpi4py>=3.1"],
        "plot": ["matplotlib>=3.8"],
        "tensorboard": ["tensorboard>=2.15"],
        "wandb": ["wandb>=0.17"],
    },
)
