from setuptools import find_packages, setup

setup(
    name="sde-diffusion",
    version="0.1.0",
    description="Score-based generative modelling through SDEs, with pluggable solvers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sde_diffusion", "sde_diffusion.*", "solvers", "solvers.*"]),
    include_package_data=True,
    # `sde-diffusion train|sample|eval|train_classifier ...`: the same flags as `python main.py --mode ...`
    entry_points={"console_scripts": ["sde-diffusion = sde_diffusion.cli:run"]},
    # Install PyTorch for your platform first (https://pytorch.org); any torch >= 2.1 works.
    install_requires=[
        "torch>=2.1",
        "torchsde>=0.2.6",
        "numpy>=1.23",
        "scipy>=1.10",
        "ml-collections>=0.1.1",
        "absl-py>=1.0",
        "tensorboard>=2.10",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "Pillow>=9.0",
        "scikit-learn>=1.2",
    ],
    # dev: the test suite, and the peers our samplers are checked against (diffusers' schedulers need no torch
    # extra; torchdiffeq is what k-diffusion's sampling module imports — k-diffusion itself installs with --no-deps,
    # see .ci/run, since its other dependencies pull torchvision and a newer torch)
    # setuptools >= 70.1 builds wheels by itself (tests/test_packaging.py builds one without build isolation)
    extras_require={"dev": ["pytest>=7", "diffusers>=0.27", "torchdiffeq>=0.2", "setuptools>=70.1"]},
)
