"""gintrain: flax.training without flax, plus a gin-configured runner."""

import glob
import os

from setuptools import setup


def _gin_data_files():
  """gin/ is installed to <prefix>/share/gintrain/gin, keeping its folders."""
  files = {}
  for path in glob.glob('gin/**/*.gin', recursive=True):
    folder = os.path.join('share', 'gintrain', os.path.dirname(path))
    files.setdefault(folder, []).append(path)
  return sorted(files.items())


setup(
    name='gintrain',
    version='0.1.0',
    description=('flax.training-compatible checkpoints, schedules and train'
                 ' state, and a gin-configured JAX experiment runner.'),
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=['lib', 'runner'],
    data_files=_gin_data_files(),
    install_requires=[
        'jax>=0.6,<0.11',
        'optax>=0.2.4,<0.3',
        'gin-config>=0.5,<0.6',
        'msgpack>=1.0,<2',
        'absl-py>=2.0,<3',
        'ml-collections>=1.0,<2',
        'numpy>=1.26,<3',
        'ml_dtypes>=0.5',
        'tensorstore>=0.1.70',
        'scikit-learn>=1.3',
        'tensorboardX>=2.6',
        'matplotlib>=3.8',
    ],
    extras_require={
        'test': ['pytest>=8', 'flax==0.12.8'],
        'orbax': ['orbax-checkpoint>=0.11'],
    },
    entry_points={'console_scripts': ['gintrain=runner.train:run']},
)
