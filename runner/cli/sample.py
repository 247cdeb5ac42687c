"""``gintrain sample``: text from a trained Llama, with a KV cache.

    gintrain sample --workdir=RUN [--checkpoint=STEP|PATH] --prompt=TEXT
        [--max_new_tokens=128] [--temperature=0.8] [--top_k=0] [--top_p=1.0]
        [--seed=0] [--num_samples=1] [--tokenizer=PATH]
    gintrain sample --hf=FOLDER --prompt=TEXT ...

``--workdir``: the model is built from the run's ``config.parsed.gin`` and
its parameters read from the latest checkpoint (or ``--checkpoint``, a step
or a file). ``--hf``: a Hugging Face folder (``config.json`` plus
safetensors, :mod:`runner.models.hf`). The prompt is encoded with
``--tokenizer`` (``byte``, a ``tokenizer.json`` or a folder holding one;
default: the HF folder's ``tokenizer.json`` if any, the run's
``text_files.tokenizer`` binding if any, else bytes), sampled with
:func:`runner.models.sampling.generate` (``--temperature=0``: greedy) and
each sample printed after the prompt, separated by a line of dashes. A
fault prints one line, ``gintrain sample: error: ...``, and exits 1.
"""

import argparse
import contextlib
import os
import sys
import time

import jax

from gintrain.lib import storage
from gintrain.runner import validation
from gintrain.runner.errors import RunnerError

__all__ = ['main', 'load_run', 'load_model']


def load_run(workdir: str, checkpoint: str | None = None):
  """``(model, params, checkpoint path)`` of a run: the model its
  ``config.parsed.gin`` builds, the parameters of its latest checkpoint
  (or ``checkpoint``: a step or a path).

  Raises:
    RunnerError: no such run, config or checkpoint; a model without
      parameters that fit.
  """
  # Imported here: the CLI's modules register flags and gin configurables.
  from gintrain.runner.cli import config  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import configurables  # pylint: disable=g-import-not-at-top
  from gintrain.runner.cli import evaluate  # pylint: disable=g-import-not-at-top
  from gintrain.runner.outputs import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from gintrain.runner.training import init_from  # pylint: disable=g-import-not-at-top
  if not storage.isdir(workdir):
    raise RunnerError(f'--workdir={workdir}: no such directory.')
  parsed = workdir_lib.path(workdir, workdir_lib.PARSED_CONFIG)
  if not storage.isfile(parsed):
    raise RunnerError(f'--workdir={workdir} holds no'
                      f' {workdir_lib.PARSED_CONFIG} (not a gintrain run).')
  with contextlib.ExitStack() as stack:
    config.parse([stack.enter_context(storage.staged_download(parsed))], [],
                 [])
  config.finalize()
  cfg = configurables.train()
  model = cfg.model
  if not callable(getattr(model, 'apply', None)) and callable(model):
    model = model()  # a factory (train.model = @models.llama without ())
  if not callable(getattr(model, 'apply', None)):
    raise RunnerError(f'{parsed}: train.model is not a model with init and'
                      f' apply ({model!r}).')
  path = evaluate.find_checkpoint(workdir, checkpoint)
  _, raw = init_from.checkpoint_params(path, '--checkpoint')
  if cfg.trainable:  # the checkpoint holds what trained: the base rebuilt
    from gintrain.runner.cli import frozen_base  # pylint: disable=g-import-not-at-top
    raw = frozen_base.full_params(cfg, workdir, path, raw)
  return model, raw, path


def load_model(args):
  """``(model, params, where, tokenizer spec)`` of ``--workdir`` or
  ``--hf``."""
  from gintrain.runner.models import hf  # pylint: disable=g-import-not-at-top
  if bool(args.workdir) == bool(args.hf):
    raise RunnerError('give one of --workdir=RUN or --hf=FOLDER.')
  if args.hf:
    model, params = hf.load(args.hf)
    spec = args.tokenizer
    if spec is None:
      spec = args.hf if os.path.isfile(
          os.path.join(args.hf, 'tokenizer.json')) else 'byte'
    return model, params, args.hf, spec
  model, params, path = load_run(args.workdir, args.checkpoint)
  spec = args.tokenizer
  if spec is None:
    import gin  # pylint: disable=g-import-not-at-top
    try:
      spec = gin.query_parameter('text_files.tokenizer')
    except (ValueError, KeyError):
      spec = None
    spec = spec if isinstance(spec, str) else 'byte'
  return model, params, path, spec


def _parser():
  p = argparse.ArgumentParser(prog='gintrain sample', description=(
      'Sample text from a trained Llama (KV cache).'))
  p.add_argument('--workdir', help='a gintrain run')
  p.add_argument('--checkpoint', help='a step or a checkpoint file')
  p.add_argument('--hf', help='a Hugging Face model folder')
  p.add_argument('--prompt', default='', help='the text to continue')
  p.add_argument('--max_new_tokens', type=int, default=128)
  p.add_argument('--temperature', type=float, default=0.8)
  p.add_argument('--top_k', type=int, default=0)
  p.add_argument('--top_p', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--num_samples', type=int, default=1)
  p.add_argument('--tokenizer', default=None,
                 help="'byte', a tokenizer.json, or a folder holding one")
  return p


def sample(args) -> list[bytes]:
  """The samples ``args`` ask for (bytes, prompt excluded)."""
  from gintrain.runner.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from gintrain.runner.models import sampling  # pylint: disable=g-import-not-at-top
  for name, value, low in (('max_new_tokens', args.max_new_tokens, 1),
                           ('num_samples', args.num_samples, 1),
                           ('top_k', args.top_k, 0)):
    validation.check_int(f'--{name}', value, low)
  validation.check_number('--temperature', args.temperature, 0)
  validation.check_number('--top_p', args.top_p, 0, 1, low_open=True)
  model, params, where, spec = load_model(args)
  if not callable(getattr(model, 'apply_cached', None)):
    raise RunnerError(f'{where}: {getattr(model, "name", model)} has no KV'
                      ' cache (gintrain sample runs models.llama).')
  tok = tokenizer_lib.load(spec)
  vocab = getattr(model, 'vocab_size', None)
  if vocab is not None and tok.vocab_size > vocab:
    raise RunnerError(f'--tokenizer={spec}: {tok.vocab_size} tokens, more'
                      f' than the model\'s embedding ({vocab}).')
  prompt = [int(t) for t in tok.encode(args.prompt.encode('utf-8'))]
  if not prompt:
    raise RunnerError('--prompt is empty (give at least one token of'
                      ' text).')
  batch = [prompt] * args.num_samples
  start = time.perf_counter()
  out = jax.device_get(sampling.generate(
      model, params, batch, args.max_new_tokens, args.temperature,
      args.top_k, args.top_p, args.seed))
  seconds = time.perf_counter() - start
  print(f'# {where}: {args.num_samples} x {args.max_new_tokens} tokens in'
        f' {seconds:.2f} s (compile included)', file=sys.stderr, flush=True)
  return [tok.decode([int(t) for t in row]) for row in out]


def main(args) -> int:
  """``gintrain sample ARGS``; returns the exit status."""
  try:
    parsed = _parser().parse_args(list(args))
    samples = sample(parsed)
  except RunnerError as e:
    print(f'gintrain sample: error: {e}', file=sys.stderr, flush=True)
    return 1
  except SystemExit as e:  # --help, bad flags
    return int(e.code or 0)
  for i, text in enumerate(samples):
    if i:
      print('-' * 40)
    sys.stdout.write(parsed.prompt + text.decode('utf-8', 'replace') + '\n')
  sys.stdout.flush()
  return 0
