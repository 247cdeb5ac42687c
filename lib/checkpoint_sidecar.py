"""Integrity sidecars of msgpack checkpoint files (``<dir>/.<name>.xxh3``).

A sidecar vouches for the bytes of its checkpoint file; the file itself
stays byte-identical to flax's. Two formats are read:

* **version 1** (one line, written before block hashes existed):
  ``xxh3_64 <16 hex digits> <size>`` -- the xxh3-64 hash of the whole
  file, which only a whole read can check.
* **version 2** (written now): a header line
  ``xxh3_64-blocks <block bytes> <size> <root>``, then one line per block
  of ``<block bytes>`` (8 MiB; the last block may be shorter) holding that
  block's xxh3-64 hash in 16 hex digits. ``<root>`` is the xxh3-64 hash of
  the block hashes (8 bytes each, big-endian): it checks the sidecar itself.
  Any byte range of the file can be vouched for by reading the whole
  blocks that cover it (:meth:`Sidecar.check_block`), so a process that
  restores only its slices of a checkpoint reads and checks only those
  blocks (``lib.msgpack_slices``); a whole read checks every block.

Writing costs what hashing the whole file cost before: the blocks are
hashed in the same single pass over the bytes as they are written
(:class:`Hasher`), instead of the whole file.

  >>> h = Hasher(block_bytes=4096)
  >>> h.update(b'x' * 5000)
  >>> side = parse('ck', h.text(5000))
  >>> side.size, side.block_bytes, len(side.blocks)
  (5000, 4096, 2)
  >>> side.check_block(1, b'x' * 904, 'ck')
  >>> try:
  ...   side.check_block(1, b'y' * 904, 'ck')
  ... except errors.CheckpointReadError as e:
  ...   print(e.reason[:41])
  its bytes 4096-5000 (block 1 of 2) do not
"""

import dataclasses
import struct

import xxhash

from gintrain.lib import checkpoint_naming
from gintrain.lib import errors

__all__ = ['Hasher', 'Sidecar', 'parse', 'BLOCK_BYTES', 'MAX_BYTES']

# Blocks of this many bytes are hashed on their own (version 2).
BLOCK_BYTES = 8 << 20
# Sidecars naming smaller blocks are refused (a crafted one could make a
# reader hash 1-byte blocks).
MIN_BLOCK_BYTES = 4096
# A sidecar is at most this long (17 bytes a block: 1 TiB of checkpoint at
# 8 MiB blocks is 2.2 MB).
MAX_BYTES = 16 << 20
ALGO_WHOLE = 'xxh3_64'
ALGO_BLOCKS = 'xxh3_64-blocks'
_DIGESTS = struct.Struct('>Q')


def _root(blocks) -> str:
  return xxhash.xxh3_64_hexdigest(b''.join(_DIGESTS.pack(d) for d in blocks))


class Hasher:
  """Hashes a file's bytes block by block as they are written.

  ``update`` takes the file's bytes in order (any split); :meth:`text` is
  the version-2 sidecar of what was fed.
  """

  def __init__(self, block_bytes: int | None = None):
    self.block_bytes = int(block_bytes or BLOCK_BYTES)
    self.digests = []
    self.nbytes = 0
    self._hasher = xxhash.xxh3_64()
    self._fill = 0  # bytes of the current block fed so far

  def update(self, data) -> None:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
      view = view.cast('B')
    n, pos, block = len(view), 0, self.block_bytes
    self.nbytes += n
    while pos < n:
      if not self._fill and n - pos >= block:  # a whole block in one call
        self.digests.append(xxhash.xxh3_64_intdigest(view[pos:pos + block]))
        pos += block
        continue
      take = min(block - self._fill, n - pos)
      self._hasher.update(view[pos:pos + take])
      self._fill += take
      pos += take
      if self._fill == block:
        self.digests.append(self._hasher.intdigest())
        self._hasher.reset()
        self._fill = 0

  def text(self, nbytes: int) -> bytes:
    """The sidecar's bytes; ``nbytes`` (the file's size) must be what was
    fed."""
    if nbytes != self.nbytes:
      raise ValueError(f'hashed {self.nbytes} bytes, the file has {nbytes}')
    blocks = self.digests + ([self._hasher.intdigest()] if self._fill
                             else [])
    lines = [f'{ALGO_BLOCKS} {self.block_bytes} {nbytes} {_root(blocks)}']
    lines += [f'{d:016x}' for d in blocks]
    return ('\n'.join(lines) + '\n').encode('ascii')


@dataclasses.dataclass(frozen=True)
class Sidecar:
  """A parsed sidecar.

  Attributes:
    size: the file's size in bytes.
    digest: version 1: the whole file's xxh3-64 (hex); None for version 2.
    block_bytes: version 2: the block size (0 for version 1).
    blocks: version 2: each block's xxh3-64 (ints).
  """
  size: int
  digest: str | None = None
  block_bytes: int = 0
  blocks: tuple = ()

  @property
  def has_blocks(self) -> bool:
    """Whether parts of the file can be vouched for (version 2)."""
    return self.digest is None

  def block_span(self, index: int) -> tuple[int, int]:
    """``(file offset, bytes)`` of block ``index``."""
    start = index * self.block_bytes
    return start, min(self.block_bytes, self.size - start)

  def check_block(self, index: int, data, name: str) -> None:
    """Raises ``CheckpointReadError`` naming ``name`` unless ``data`` is
    block ``index`` of the file."""
    got = xxhash.xxh3_64_intdigest(data)
    if got != self.blocks[index]:
      start, n = self.block_span(index)
      raise errors.CheckpointReadError(
          name, f'its bytes {start}-{start + n} (block {index} of'
          f' {len(self.blocks)}) do not match its integrity sidecar'
          f' (xxh3_64 {got:016x}, expected {self.blocks[index]:016x}):'
          ' corrupted')


def _malformed(name: str) -> errors.CheckpointReadError:
  return errors.CheckpointReadError(
      name, f'its integrity sidecar {checkpoint_naming.sidecar_path(name)}'
      ' is malformed')


def _hex(text: str) -> int:
  if len(text) != 16:
    raise ValueError(text)
  return int(text, 16)


def parse(name: str, data: bytes) -> Sidecar:
  """The sidecar of the file ``name`` from its bytes (either version).

  Raises:
    gintrain.lib.errors.CheckpointReadError: malformed (naming ``name``).
  """
  if len(data) > MAX_BYTES:
    raise _malformed(name)
  try:
    lines = data.decode('ascii').split('\n')
    head = lines[0].split()
    if lines[-1] or len(lines) < 2:
      raise ValueError('no final newline')
    if head and head[0] == ALGO_WHOLE and len(head) == 3 and len(lines) == 2:
      _hex(head[1])
      if not head[2].isdigit():
        raise ValueError(head[2])
      return Sidecar(int(head[2]), digest=head[1].lower())
    if not head or head[0] != ALGO_BLOCKS or len(head) != 4:
      raise ValueError(head)
    if not (head[1].isdigit() and head[2].isdigit()):
      raise ValueError(head)
    block, size = int(head[1]), int(head[2])
    blocks = tuple(_hex(line) for line in lines[1:-1])
    if (block < MIN_BLOCK_BYTES or len(blocks) != -(-size // block)
        or _root(blocks) != head[3].lower()):
      raise ValueError(head)
    return Sidecar(size, block_bytes=block, blocks=blocks)
  except (ValueError, UnicodeDecodeError):
    raise _malformed(name) from None


def verify_file(pread_into, size: int, name: str, sidecar: Sidecar) -> None:
  """Checks a whole file of ``size`` bytes against ``sidecar`` in one pass
  (``pread_into(view, offset)`` fills ``view`` from the file).

  Raises:
    gintrain.lib.errors.CheckpointReadError: the size or a hash differs.
  """
  if sidecar.size != size:
    raise errors.CheckpointReadError(
        name, f'{size} bytes, but its integrity sidecar says {sidecar.size}'
        ' (truncated or replaced)')
  piece = sidecar.block_bytes or BLOCK_BYTES
  view = memoryview(bytearray(min(piece, max(size, 1))))
  hasher = None if sidecar.has_blocks else xxhash.xxh3_64()
  offset, index = 0, 0
  while offset < size:
    part = view[:min(piece, size - offset)]
    pread_into(part, offset)
    if hasher is None:
      sidecar.check_block(index, part, name)
    else:
      hasher.update(part)
    offset, index = offset + len(part), index + 1
  if hasher is not None and hasher.hexdigest() != sidecar.digest:
    raise errors.CheckpointReadError(
        name, f'its content does not match its integrity sidecar (xxh3_64'
        f' {hasher.hexdigest()}, expected {sidecar.digest}): corrupted')
