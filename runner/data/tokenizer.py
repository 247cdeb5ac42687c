"""Tokenizers: bytes (the default) or a Hugging Face ``tokenizer.json``.

Both map bytes to int token ids and back, exactly::

    >>> t = load('byte')
    >>> t.encode(b'hi').tolist(), t.decode([104, 105]), t.vocab_size
    ([104, 105], b'hi', 256)

:func:`load` takes ``'byte'``, a ``tokenizer.json`` file, or a model folder
holding one (read with the ``tokenizers`` library; nothing is downloaded).
Text is encoded from bytes: valid UTF-8 goes through the tokenizer; bytes
that are not UTF-8 (a Latin-1 source file, say) become the byte-level
tokens of those bytes, so a byte-level BPE (GPT-2, Llama 3, Qwen2, and what
``gintrain tokenizer train`` writes) decodes every input back to the same
bytes. ``token_bytes`` gives each token's length in bytes, with which the
language-model task reports bits per byte whatever the tokenizer.
``hash`` identifies the tokenizer (``'byte'``, or a SHA-256 of the
normalised JSON): prepared data records it, and training refuses data made
with another tokenizer.
"""

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from gintrain.runner.errors import RunnerError

__all__ = ['Tokenizer', 'ByteTokenizer', 'HFTokenizer', 'load', 'train_bpe',
           'TOKENIZER_FILE', 'expand_files']

TOKENIZER_FILE = 'tokenizer.json'
_SURROGATES = re.compile('[\udc80-\udcff]+')


def _bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable character table of byte-level BPEs."""
  keep = (list(range(ord('!'), ord('~') + 1)) +
          list(range(ord('\xa1'), ord('\xac') + 1)) +
          list(range(ord('\xae'), ord('\xff') + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class Tokenizer:
  """Bytes <-> token ids (see the module doc).

  Attributes:
    name: for logs and errors.
    vocab_size: ids are ``0 .. vocab_size - 1``.
    hash: identifies the vocabulary and rules.
  """
  name: str
  vocab_size: int
  hash: str

  def encode(self, data: bytes | str) -> np.ndarray:
    """The int32 token ids of ``data``."""
    raise NotImplementedError

  def encode_batch(self, items: Sequence[bytes | str]) -> list:
    return [self.encode(x) for x in items]

  def decode(self, ids: Iterable[int]) -> bytes:
    """The bytes of ``ids``."""
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    """int32 ``(vocab_size,)``: each token's length in bytes."""
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  """One token per byte (ids 0-255)."""
  name, vocab_size, hash = 'byte', 256, 'byte'

  def encode(self, data):
    if isinstance(data, str):
      data = data.encode('utf-8')
    return np.frombuffer(bytes(data), np.uint8).astype(np.int32)

  def decode(self, ids):
    return np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids,
                      np.int64).astype(np.uint8).tobytes()

  def token_bytes(self):
    return np.ones(256, np.int32)


class HFTokenizer(Tokenizer):
  """A ``tokenizers.Tokenizer`` read from ``path`` (a tokenizer.json)."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path = path
    try:
      with open(path, 'rb') as f:
        raw = f.read()
      self._tok = tokenizers.Tokenizer.from_str(raw.decode('utf-8'))
      spec = json.loads(raw)
    except OSError as e:
      raise RunnerError(f'tokenizer {path}: cannot read it:'
                        f' {e.strerror or e}.') from e
    except Exception as e:  # pylint: disable=broad-except
      raise RunnerError(f'tokenizer {path}: not a tokenizers JSON file'
                        f' ({type(e).__name__}: {str(e)[:200]}).') from e
    self.name = path
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    canonical = json.dumps(spec, sort_keys=True, separators=(',', ':'))
    self.hash = 'sha256:' + hashlib.sha256(canonical.encode()).hexdigest()
    self._table = self._byte_table()

  def _byte_table(self) -> list | None:
    """id -> bytes, for byte-level vocabularies (else None)."""
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = self._tok.get_vocab(with_added_tokens=True)
    added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
    table = [b''] * self.vocab_size
    byte_level = 0
    for token, i in vocab.items():
      if i >= self.vocab_size:
        continue
      if token in added:
        continue  # special tokens decode to no bytes
      if all(c in decoder for c in token):
        table[i] = bytes(decoder[c] for c in token)
        byte_level += 1
      else:
        return None
    single = {t for t in table if len(t) == 1}
    return table if byte_level and len(single) == 256 else None

  def _byte_ids(self, data: bytes) -> list:
    """The ids of the single-byte tokens of ``data`` (byte-level only)."""
    if self._table is None:
      raise RunnerError(f'tokenizer {self.path}: input that is not UTF-8'
                        ' needs a byte-level tokenizer.')
    if not hasattr(self, '_single'):
      self._single = {t[0]: i for i, t in enumerate(self._table)
                      if len(t) == 1}
    return [self._single[b] for b in data]

  def _encode_text(self, text: str) -> list:
    if not text:
      return []
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode(self, data):
    if isinstance(data, str):
      return np.asarray(self._encode_text(data), np.int32)
    text = bytes(data).decode('utf-8', errors='surrogateescape')
    if not _SURROGATES.search(text):
      return np.asarray(self._encode_text(text), np.int32)
    ids, pos = [], 0
    for m in _SURROGATES.finditer(text):
      ids += self._encode_text(text[pos:m.start()])
      ids += self._byte_ids(m.group().encode('utf-8', 'surrogateescape'))
      pos = m.end()
    ids += self._encode_text(text[pos:])
    return np.asarray(ids, np.int32)

  def encode_batch(self, items):
    texts = [x.decode('utf-8', errors='surrogateescape')
             if isinstance(x, bytes) else x for x in items]
    if any(_SURROGATES.search(t) for t in texts):
      return [self.encode(x) for x in items]
    out = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in out]

  def decode(self, ids):
    ids = [int(i) for i in ids]
    if self._table is not None:
      return b''.join(self._table[i] for i in ids)
    return self._tok.decode(ids, skip_special_tokens=False).encode('utf-8')

  def token_bytes(self):
    if self._table is not None:
      return np.asarray([len(t) for t in self._table], np.int32)
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i) or ''
      if re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', piece):
        out[i] = 1
      else:
        out[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
    return out


def resolve_path(path: str) -> str:
  """``path`` itself, or ``path/tokenizer.json`` for a folder.

  Raises:
    RunnerError: neither exists.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    inner = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(inner):
      raise RunnerError(f'tokenizer {path}: the folder has no'
                        f' {TOKENIZER_FILE}.')
    return inner
  if not os.path.isfile(path):
    raise RunnerError(f'tokenizer {path}: no such file or folder.')
  return path


_CACHE: dict = {}


def load(spec: str | Tokenizer | None) -> Tokenizer:
  """A tokenizer from ``'byte'`` (or None), a tokenizer.json, or a folder.

  Raises:
    RunnerError: the file is missing or not a tokenizer, naming it.
  """
  if isinstance(spec, Tokenizer):
    return spec
  if spec is None or spec == 'byte':
    return ByteTokenizer()
  path = os.path.abspath(resolve_path(str(spec)))
  key = (path, os.path.getmtime(path))
  if key not in _CACHE:
    _CACHE[key] = HFTokenizer(path)
  return _CACHE[key]


def _read_texts(files: Sequence[str]) -> Iterable[str]:
  for path in files:
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise RunnerError(f'tokenizer train: cannot read {path}:'
                        f' {e.strerror or e}.') from e
    yield data.decode('utf-8', errors='replace')


def train_bpe(files: Sequence[str], vocab_size: int, out: str,
              min_frequency: int = 2) -> HFTokenizer:
  """Trains a byte-level BPE of ``vocab_size`` tokens on ``files`` (text;
  bytes that are not UTF-8 count as U+FFFD while training) and writes it to
  ``out`` (a tokenizer.json, or a folder to put one in).

  Raises:
    RunnerError: a bad vocab_size or an unreadable file.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  if not isinstance(vocab_size, int) or vocab_size < 257:
    raise RunnerError(f'--vocab_size must be an integer > 256 (the byte'
                      f' alphabet), got {vocab_size!r}.')
  if not files:
    raise RunnerError('tokenizer train: no input files given.')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False, special_tokens=[])
  tok.train_from_iterator(_read_texts(files), trainer=trainer,
                          length=len(files))
  if os.path.isdir(out) or out.endswith(os.sep):
    os.makedirs(out, exist_ok=True)
    out = os.path.join(out, TOKENIZER_FILE)
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  tok.save(out + '.tmp')
  os.replace(out + '.tmp', out)
  return HFTokenizer(out)


def expand_files(paths, pattern: str = '*') -> list[str]:
  """``paths`` with folders replaced by their files matching ``pattern``
  (sorted; ``site-packages`` skipped).

  Raises:
    RunnerError: a path that does not exist, or nothing to read.
  """
  out = []
  for path in paths:
    if os.path.isdir(path):
      for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in
                         ('site-packages', 'dist-packages', '__pycache__'))
        out += [os.path.join(folder, f) for f in sorted(files)
                if fnmatch.fnmatch(f, pattern) and
                not os.path.islink(os.path.join(folder, f))]
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise RunnerError(f'{path}: no such file or folder.')
  if not out:
    raise RunnerError(f'no file matching {pattern!r} in {" ".join(paths)}.')
  return out
