"""bmgpt_jax: BioMedGPT (molecules, proteins and text in one GPT) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="bmgpt_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of BioMedGPT (PharMolix/OpenBioMed) for TPU pods and GPUs",
    # configs/ stays at the top of the repository and is installed as bmgpt_jax/configs/, so a non-editable
    # install (`pip install .`, a wheel) finds the named configs (bmgpt_jax/config.py looks there first)
    packages=find_packages(include=["bmgpt_jax", "bmgpt_jax.*"]) + ["bmgpt_jax.configs"],
    package_dir={"bmgpt_jax.configs": "configs"},
    package_data={"bmgpt_jax.configs": ["*.yaml"]},
    entry_points={"console_scripts": ["bmgpt-convert = bmgpt_jax.convert.cli:main"]},   # = convert_weights.py
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "jraph>=0.0.6.dev0",
        "rdkit>=2024.3",
        "transformers>=4.45,<6",
        "tensorflow-datasets>=4.9.9,<5",
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "tensorboard>=2.14",    # the viewer of the logs, as the run prints: tensorboard --logdir RUN/tensorboard
        "nltk>=3.9",            # evaluation: BLEU and METEOR as MolT5 computes them
        "rouge-score>=0.1.2",   # evaluation: ROUGE-1/2/L
        "matplotlib>=3.7",      # evaluation: the report's bar chart
    ],
    extras_require={
        "tpu": ["jax[tpu]>=0.7,<0.11"],
        # libtpu (the version jax pins) on any host: `python -m bmgpt_jax.plan --topology v5e:4x4` compiles for TPUs
        "tpu-plan": ["jax[tpu]>=0.7,<0.11"],
        # also on a host without a GPU: `python -m bmgpt_jax.plan --topology h100:8` compiles for 8 H100s
        "gpu": ["jax[cuda12]>=0.7,<0.11"],
        # setuptools >= 70.1 builds wheels offline (tests/test_install.py installs the package with pip --target)
        "dev": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "setuptools>=70.1"],
    },
)
