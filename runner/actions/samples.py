"""Sampled continuations of held-out text, written at the end of a run."""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gintrain.lib import storage
from gintrain.runner.actions import base
from gintrain.runner import validation
from gintrain.runner.parallel import watchdog

__all__ = ['WriteSamples', 'SAMPLES_FILE', 'sample']

SAMPLES_FILE = 'samples.txt'


def sample(apply_fn, temperature: float = 0.8):
  """``fill(start, tokens, rng, params)``: fills ``tokens`` (``int32 (n,
  length)``, the prompt at the start) token by token from position
  ``start`` on, from the model's distribution (temperature 0: greedy), and
  returns them.

  ``apply_fn(params, tokens) -> logits (n, length, vocab)``; the whole
  window is recomputed for each token (no cache: short samples only).
  """

  def fill(start, tokens, rng, params):
    def body(i, carry):
      tokens, rng = carry
      rng, key = jax.random.split(rng)
      logits = apply_fn(params, tokens)[:, i - 1].astype(jnp.float32)
      if temperature > 0:
        nxt = jax.random.categorical(key, logits / temperature)
      else:
        nxt = jnp.argmax(logits, -1)
      return tokens.at[:, i].set(nxt.astype(tokens.dtype)), rng
    return jax.lax.fori_loop(start, tokens.shape[1], body, (tokens, rng))[0]

  return fill


class WriteSamples(base.Action):
  """At the end, continues the first ``prompt_length`` bytes of ``num``
  held-out examples and writes prompts and continuations to
  ``<workdir>/samples.txt``. For byte-level language models (``tokens``).

  Every process runs it: the parameters are fetched to the host with the
  partitioner, which for arrays split over several processes is a
  cross-process gather that all of them must join (a gather on process 0
  alone waits forever for the others, issue 18). Process 0 then samples on
  its own devices and writes the file; the others go on at once. A
  finished gather and a finished sampling count as progress for the step
  watchdog (``runner.parallel.watchdog.touch``).

  Args:
    num: how many samples (0: none, no file).
    prompt_length: bytes of held-out text given as the prompt.
    temperature: sampling temperature (0: greedy).
    seed: the sampling seed.
  """

  name = 'samples'

  def __init__(self, num: int = 4, prompt_length: int = 48,
               temperature: float = 0.7, seed: int = 0):
    self.num = validation.check_int('write_samples.num', num, 0)
    self.prompt_length = validation.check_int(
        'write_samples.prompt_length', prompt_length, 1)
    self.temperature = validation.check_number(
        'write_samples.temperature', temperature, 0)
    self.seed = validation.check_int('write_samples.seed', seed)
    self.run = self.workdir = None

  def bind(self, run, workdir):
    self.run, self.workdir = run, workdir

  def due(self, step, last):
    return last and self.num > 0  # on every process: see the class doc

  def __call__(self, step, state, metrics):
    run = self.run
    # Collective in a multi-process sharded run: every process takes part.
    params, model_state = run.partitioner.get(
        (state.params, state.model_state))
    watchdog.touch()
    if jax.process_index() != 0:
      return
    prompts = []
    for batch in run.source.eval_batches():
      tokens = np.asarray(batch[run.task.input_key])
      keep = np.asarray(batch['mask']) > 0
      prompts += list(tokens[keep])
      if len(prompts) >= self.num:
        break
    if not prompts:
      return
    tokens = np.stack(prompts[:self.num])[:, :-1].astype(np.int32)
    length = min(self.prompt_length, tokens.shape[1] - 1)
    apply_fn = lambda p, t: run.task.apply_eval(p, model_state, t)  # pylint: disable=unnecessary-lambda-assignment
    fill = jax.jit(sample(apply_fn, self.temperature), static_argnums=0)
    # Host inputs: this process's first device only (no collective).
    out = np.asarray(fill(length, jnp.asarray(tokens),
                          jax.random.key(self.seed), params))
    watchdog.touch()
    path = storage.join(self.workdir, SAMPLES_FILE)  # a path or a URL
    lines = []
    for row in out:
      text = bytes(row.astype(np.uint8))
      lines += [f'=== prompt (step {step}) ===',
                text[:length].decode('utf-8', 'replace'),
                '=== continuation ===',
                text[length:].decode('utf-8', 'replace') + '\n']
    storage.write_text(path, ''.join(f'{line}\n' for line in lines))
    logging.info('samples written to %s', path)
