"""runner.validation: each check kind, good and bad, and its error line."""

import re

import numpy as np
import pytest

from gintrain.runner import train
from gintrain.runner import validation as v
from gintrain.runner.errors import RunnerError


def _message(check, *args, **kwargs):
  with pytest.raises(v.ArgumentError) as e:
    check(*args, **kwargs)
  return str(e.value)


def test_the_error_is_a_runner_error_and_a_value_error():
  with pytest.raises(RunnerError):
    v.check_int('a.b', -1, 0)
  with pytest.raises(ValueError):  # what the data modules' callers catch
    v.check_int('a.b', -1, 0)
  e = pytest.raises(v.ArgumentError, v.check_int, 'train.seed', 'x', 0).value
  assert e.name == 'train.seed' and e.qualified
  assert not pytest.raises(v.ArgumentError, v.check_int, 'seed', 'x',
                           0).value.qualified
  assert pytest.raises(v.ArgumentError, v.check_int, '--top_k', -1,
                       0).value.qualified


def test_int():
  assert v.check_int('n', 3, 0) == 3
  assert v.check_int('n', 0, 0) == 0 and v.check_int('n', 1, 1, 1) == 1
  assert v.check_int('n', np.int64(3), 0) == 3 and isinstance(
      v.check_int('n', np.int64(3), 0), int)
  assert v.check_int('n', None, 1, allow_none=True) is None
  assert v.check_int('n', 5, 1, 5) == 5
  assert _message(v.check_int, 'train.seed', -1, 0) == (
      'train.seed must be an integer >= 0, got -1.')
  assert _message(v.check_int, 'n', True, 0) == (
      'n must be an integer >= 0, got True.')
  assert _message(v.check_int, 'n', 2.0, 0) == (
      'n must be an integer >= 0, got 2.0.')
  assert _message(v.check_int, 'n', 0, 1, allow_none=True) == (
      'n must be None or an integer >= 1, got 0.')
  assert _message(v.check_int, 'n', 6, 1, 5) == (
      'n must be an integer in [1, 5], got 6.')
  assert _message(v.check_int, 'n', 6, None, 5) == (
      'n must be an integer <= 5, got 6.')
  assert _message(v.check_int, 'n', 'x') == 'n must be an integer, got \'x\'.'
  assert v.is_int(3, 1) and not v.is_int(0, 1) and not v.is_int(False)


def test_positive_int():
  assert v.check_positive_int('train.batch_size', 1) == 1
  assert v.check_positive_int('train.eval_every', None,
                              allow_none=True) is None
  for bad in (0, -3, 1.5, '2', True, None):
    assert _message(v.check_positive_int, 'train.batch_size', bad) == (
        f'train.batch_size must be a positive integer, got {bad!r}.')


def test_number_ranges():
  assert v.check_number('lr', 0) == 0.0
  assert v.check_number('lr', 3, 0) == 3.0
  assert v.check_number('f', 1, 0, 1, low_open=True) == 1.0
  assert v.check_number('c', None, 0, allow_none=True) is None
  assert _message(v.check_number, 'lr', -1, 0) == (
      'lr must be a number >= 0, got -1.')
  assert _message(v.check_number, 'h', 0, 0, low_open=True) == (
      'h must be a number > 0, got 0.')
  assert _message(v.check_number, 'p', 0, 0, 1, low_open=True) == (
      'p must be a number in (0, 1], got 0.')
  assert _message(v.check_number, 'p', 1, 0, 1, high_open=True) == (
      'p must be a number in [0, 1), got 1.')
  assert _message(v.check_number, 'x', 2, None, 1, high_open=True) == (
      'x must be a number < 1, got 2.')
  for bad in (float('nan'), float('inf'), True, '1', None):
    with pytest.raises(v.ArgumentError, match='must be a number >= 0'):
      v.check_number('x', bad, 0)
  assert _message(v.check_number, 'train.peak', -1, 0, low_open=True,
                  unit='FLOP/s', allow_none=True) == (
      'train.peak must be None or a number > 0 (FLOP/s), got -1.')
  assert v.check_fraction('f', 0.5) == 0.5
  for bad in (0, 1, 1.5, True):
    assert _message(v.check_fraction, 'f', bad) == (
        f'f must be a number in (0, 1), got {bad!r}.')


def test_choice_with_did_you_mean():
  assert v.check_choice('m', 'max', ('min', 'max')) == 'max'
  assert _message(v.check_choice, 'early_stopping.mode', 'up',
                  ('min', 'max')) == (
      "early_stopping.mode must be 'min' or 'max', got 'up'.")
  assert _message(v.check_choice, 'train.parallelism', 'shardd',
                  ('auto', 'single', 'pmap', 'sharded')) == (
      'train.parallelism must be one of auto, single, pmap, sharded, got'
      " 'shardd'. (did you mean 'sharded'?)")
  assert _message(v.check_choice, 'k', [1], (1, 2, 3)) == (
      'k must be one of 1, 2, 3, got [1].')


def test_bool_callable_name():
  assert v.check_bool('a', False) is False
  for bad in (0, 1, 'True', None):
    assert _message(v.check_bool, 'policy.async_save', bad) == (
        f'policy.async_save must be True or False, got {bad!r}.')
  assert v.check_callable('f', len) is len
  assert _message(v.check_callable, 'train.state_factory', 3) == (
      'train.state_factory must be callable, got 3.')
  assert v.check_callables('a', [len, abs], 'a list') == (len, abs)
  assert v.check_callables('a', None, 'a list', allow_none=True) is None
  for bad in ('len', [len, 3], 5):
    assert _message(v.check_callables, 'train.actions', bad,
                    'a list of actions') == (
        f'train.actions must be a list of actions, got {bad!r}.')
  assert v.check_name('m', 'loss') == 'loss'
  assert v.check_name('m', None, allow_none=True) is None
  assert _message(v.check_name, 'm', '', 'a metric name') == (
      "m must be a metric name, got ''.")
  no_digit = lambda p: not p[-1].isdigit()  # pylint: disable=unnecessary-lambda-assignment
  assert v.check_name('p', 'ckpt_', test=no_digit) == 'ckpt_'
  assert _message(v.check_name, 'p', 'ckpt1', 'a prefix', test=no_digit) == (
      "p must be a prefix, got 'ckpt1'.")


def test_regex_lists():
  assert v.check_regex('r', 'a+').search('caab')
  compiled = re.compile('x')
  assert v.check_regex('r', compiled) is compiled
  assert [p.pattern for p in v.check_regex_list('init_from.include', 'a')] == [
      'a']
  assert [p.pattern for p in v.check_regex_list('i', ['a', '^b$'])] == [
      'a', '^b$']
  assert v.check_regex_list('i', ()) == ()
  with pytest.raises(v.ArgumentError, match=r"init_from.exclude: '\(' is not"
                     r' a regular expression \(missing \), unterminated'):
    v.check_regex_list('init_from.exclude', ['ok', '('])
  with pytest.raises(v.ArgumentError, match=r'i: 3 is not a regular'):
    v.check_regex_list('i', [3])
  assert _message(v.check_regex_list, 'i', 3) == (
      'i must be a list of regular expressions, got 3.')


def test_converted_bindings_fail_with_one_line(capsys):
  """Through the command line, before any JAX work: the binding named; an
  unqualified name raised inside a configurable gets its name added."""
  for binding, line in (
      ('checkpoint_policy.keep=-1', 'checkpoint_policy.keep must be an'
       ' integer >= 0, got -1.'),
      ('digits.test_fraction=1.5', 'test_fraction must be a number in'
       " (0, 1), got 1.5. (in gin configurable 'digits')")):
    code = train.main_with_flags(['gintrain', '--workdir=/nonexistent/w',
                                  f'--gin.{binding}'])
    err = capsys.readouterr().err
    assert code == 1
    assert [l for l in err.splitlines() if l.startswith('gintrain:')] == [
        f'gintrain: error: {line}']


def test_converted_sweep_and_model_checks():
  """The sweep file's settings, the sweep's flags and the Llama arguments go
  through the same checks (issue 17)."""
  from gintrain.runner.models import llama  # pylint: disable=g-import-not-at-top
  from gintrain.runner.sweep import executors, spec, status  # pylint: disable=g-import-not-at-top
  assert _message(spec.parse_text, "sweep.mode = 'zipp'\n", 'demo') == (
      "demo:1: sweep.mode must be one of product, zip, random, got 'zipp'."
      " (did you mean 'zip'?)")
  assert _message(spec.parse_text, 'a.x = [1]\nsweep.samples = 0\n',
                  'demo') == (
                      'demo:2: sweep.samples must be an integer >= 1, got 0.')
  assert _message(spec.parse_text, "sweep.seed = 'x'\n", 'demo') == (
      "demo:1: sweep.seed must be an integer, got 'x'.")
  assert spec.parse_text('sweep.seed = -3\nsweep.samples = 2\n').seed == -3
  assert _message(executors.run_local, None, [], 0) == (
      '--parallel must be an integer >= 1, got 0.')
  assert _message(status.render, [], 'accuracy', 'yaml') == (
      "--format must be one of table, csv, json, md, got 'yaml'.")
  assert _message(llama.llama, vocab_size=1) == (
      'llama.vocab_size must be an integer >= 2, got 1.')
  assert _message(llama.llama, sliding_window=0) == (
      'llama.sliding_window must be None or an integer >= 1, got 0.')
  assert _message(llama.llama, head_dim=True) == (
      'llama.head_dim must be an integer >= 2, got True.')
  assert llama.llama(num_heads=np.int64(4)).num_heads == 4


def test_converted_distributed_checks():
  from gintrain.runner.parallel import distributed  # pylint: disable=g-import-not-at-top
  assert _message(distributed.resolve, 'auto', process_count=0,
                  environ={}) == (
                      '--process_count must be an integer >= 1, got 0.')
  assert _message(distributed.barrier, 'a/b') == (
      "barrier name must be letters, digits and _.- only, got 'a/b'.")
  # its own error type is a user error too (one line), and a ValueError
  assert issubclass(distributed.DistributedConfigError, RunnerError)
  assert issubclass(distributed.DistributedConfigError, ValueError)


def test_multiple():
  assert v.check_multiple('train.batch_size', 16, 8, '8 (devices)') == 16
  assert _message(v.check_multiple, 'transformer.width', 10, 4,
                  'heads=4') == (
                      'transformer.width=10 must be a multiple of heads=4.')
  from gintrain.runner.models import transformer  # pylint: disable=g-import-not-at-top
  assert _message(transformer.transformer, width=10, heads=4) == (
      'transformer.width=10 must be a multiple of heads=4.')
  assert _message(transformer.transformer, positions='rotari') == (
      "transformer.positions must be 'learned' or 'rotary', got 'rotari'."
      " (did you mean 'rotary'?)")
  assert _message(transformer.transformer, depth=0) == (
      'transformer.depth must be an integer >= 1, got 0.')


def test_converted_data_checks():
  from gintrain.runner.data import corpora, packing, sources, text  # pylint: disable=g-import-not-at-top
  assert _message(packing.Rows, None, 8, mode='packed') == (
      "packing mode must be 'pack' or 'pad', got 'packed'. (did you mean"
      " 'pack'?)")
  assert _message(sources.JsonlDocs, '/nonexistent.jsonl',
                  on_bad_line='skipp') == (
                      "jsonl.on_bad_line must be 'skip' or 'error', got"
                      " 'skipp'. (did you mean 'skip'?)")
  assert _message(corpora.lm_source, None, None, 0) == (
      'length must be an integer >= 1, got 0.')
  assert _message(text.text_files, length=True) == (
      'text_files.length must be an integer >= 1, got True.')


def test_converted_plain_model_checks():
  from gintrain.runner.models import plain  # pylint: disable=g-import-not-at-top
  assert _message(plain.mlp, activation='rellu') == (
      'activation must be one of elu, gelu, relu, sigmoid, silu, tanh, got'
      " 'rellu'. (did you mean 'relu'?)")
  assert _message(plain.cnn, pool='mean') == (
      "pool must be 'avg' or 'max', got 'mean'.")
  assert _message(plain.cnn, dense=-1) == (
      'dense must be an integer >= 0, got -1.')
