"""gintrain: flax.training without flax, plus a gin-configured runner."""

import sys

from setuptools import find_packages, setup

# The Pythons that install and pass (see python_requires below). pip checks
# python_requires only after resolving every dependency (about a minute on
# 3.10, which then failed building an old PyYAML); this stops it at once.
SUPPORTED_PYTHONS = ((3, 11), (3, 12), (3, 13))
if sys.version_info[:2] not in SUPPORTED_PYTHONS:
  sys.exit('gintrain supports Python '
           + ', '.join('.'.join(map(str, v)) for v in SUPPORTED_PYTHONS)
           + f'; this is Python {sys.version.split()[0]} ({sys.executable}).')

# One namespace, mapped from the top-level folders: `gintrain.lib` is lib/,
# `gintrain.runner` is runner/ (with its subpackages), and the shipped
# configs in gin/ are package data of `gintrain.gin` (read through
# importlib.resources), so installing never claims the top-level names
# `lib`, `runner` or `gin`.
_PACKAGE_DIRS = {'gintrain.lib': 'lib', 'gintrain.runner': 'runner',
                 'gintrain.gin': 'gin'}
_PACKAGES = sorted(_PACKAGE_DIRS) + [
    f'gintrain.runner.{sub}' for sub in find_packages('runner')]


setup(
    name='gintrain',
    version='0.1.0',
    description=('flax.training-compatible checkpoints, schedules and train'
                 ' state, and a gin-configured JAX experiment runner.'),
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    # Exactly the Pythons that install and pass here (tests/test_install.py's
    # GINTRAIN_INSTALL_PYTHONS check): current jax and jaxlib publish no
    # wheels for 3.10, where pip used to backtrack for minutes and die
    # building an old PyYAML; with this bound it refuses at once.
    python_requires='>=3.11,<3.14',
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIRS,
    package_data={'gintrain.gin': ['*.gin', '*/*.gin', 'sweeps/*.sweep',
                                   'README.md']},
    install_requires=[
        'jax>=0.6,<0.11',
        'optax>=0.2.5,<0.3',
        'gin-config>=0.5,<0.6',
        'msgpack>=1.0,<2',
        'absl-py>=2.0,<3',
        'ml-collections>=1.0,<2',
        'numpy>=1.26,<3',
        'ml_dtypes>=0.5',
        'tensorstore>=0.1.70',
        'scikit-learn>=1.3',
        'tensorboardX>=2.6',
        'google-crc32c>=1.5',  # event-file checksums in C (runner.outputs.writers)
        'matplotlib>=3.8',
        'grain>=0.2.12',
        'xxhash>=3.0',  # checkpoint integrity sidecars
        'tokenizers>=0.15',  # tokenizer.json (runner.data.tokenizer)
        'array-record>=0.5',  # prepared shards (runner.data.sources)
        'pyarrow>=14',  # Parquet sources
        'safetensors>=0.4',  # Hugging Face checkpoints (runner.models.hf)
    ],
    extras_require={
        # The S3 tests run a real S3 API server (moto_server) on loopback.
        # s3fs's aiobotocore pins botocore tightly and moto's boto3 follows
        # botocore: listed together (no boto3 of its own) pip resolves them
        # without backtracking (a fresh '.[test,orbax]' dry-run: 52 s, 27 s
        # without these five).
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'mkdocs>=1.6,<2',
                 'mkdocstrings[python]>=0.26', 'flax==0.12.8',
                 'wandb>=0.19.10',
                 'fsspec>=2024.6', 's3fs>=2024.6', 'moto[s3]>=5.0',
                 'flask>=3', 'flask-cors>=4',
                 # Oracles of tests/test_hf.py: transformers on PyTorch's CPU
                 # build. Pinned: this index serves torch 2.13.0 as a local
                 # CPU wheel (2.13.0+cpu, ~200 MB), while an unpinned `torch`
                 # resolves to the newest PyPI wheel, the multi-GB CUDA build.
                 # Elsewhere install torch from PyTorch's CPU index first
                 # (--index-url https://download.pytorch.org/whl/cpu).
                 'torch==2.13.0', 'transformers>=5.0,<6'],
        # The documentation site (mkdocs.yml; `mkdocs build`).
        'docs': ['mkdocs>=1.6,<2', 'mkdocstrings[python]>=0.26'],
        'wandb': ['wandb>=0.19.10'],
        'orbax': ['orbax-checkpoint>=0.11'],
        # Checkpoints and --workdir on object stores (lib/storage.py).
        'gcs': ['fsspec>=2024.6', 'gcsfs>=2024.6'],
        's3': ['fsspec>=2024.6', 's3fs>=2024.6'],
        # gintrain sweep --search=optuna (runner/sweep/search.py).
        'sweep': ['optuna>=3.6'],
    },
    entry_points={'console_scripts': ['gintrain=gintrain.runner.cli.main:run']},
)
