"""A user's flax models, bound from gin (flax is a test-only dependency)."""

import gin
from flax import linen as nn
from flax import nnx


class CNN(nn.Module):
  """Conv -> BatchNorm -> relu -> Dropout -> Dense, for 8x8x1 digits."""
  num_classes: int = 10
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


@gin.configurable
def linen_cnn(num_classes: int = 10, dropout: float = 0.5):
  return CNN(num_classes=num_classes, dropout=dropout)


@gin.configurable
class NnxMLP(nnx.Module):
  """Linear -> relu -> Dropout -> Linear."""

  def __init__(self, rngs, features=32, num_classes=10, dropout=0.5):
    self.hidden = nnx.Linear(64, features, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.hidden(x))))
