"""The tests' tiny experiment: a 16-unit MLP on the 4-class synthetic task,
12 steps, logs, evals and checkpoints every 4 (shared by the test modules)."""

from gintrain.runner import train

TINY = [
    '--gin_file=run.gin', '--gin_file=models/mlp.gin',
    '--gin_file=datasets/synthetic.gin', '--gin_file=optimizers/adam.gin',
    '--gin.mlp.features=(16,)', '--gin.mlp.num_classes=4',
    '--gin.train.batch_size=32', '--gin.train.num_epochs=None',
    '--gin.train.num_steps=12', '--gin.train.log_every=4',
    '--gin.train.eval_every=4', '--gin.optimizer.learning_rate=0.01',
    '--gin.checkpoint_policy.every_steps=4',
]


def run(workdir, *args, hooks=()):
  """``main_with_flags`` on the tiny experiment in ``workdir``."""
  return train.main_with_flags(
      ['gintrain', f'--workdir={workdir}', *TINY, *args], hooks=hooks)
