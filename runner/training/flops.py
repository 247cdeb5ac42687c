"""Model FLOPs and MFU for the train records.

A model that counts its own FLOPs (``flops_per_token(seq_len, training)``:
``models.llama``, ``models.transformer``, and ``models.lora`` through its
base) gives every train record ``model_flops_per_sec`` = FLOPs per token x
``tokens_per_sec``; models without it (the MLP, the CNN, your own) get no
such field: XLA's ``cost_analysis()`` of the compiled step is what
``--dry_run`` prints for them. ``mfu`` (model FLOPs utilisation) is
``model_flops_per_sec / (peak x devices)`` where the peak per device is
known: ``train.peak_flops_per_device``, or :data:`PEAKS` looked up from
``jax.devices()[0].device_kind``. The CPU has no entry.

    >>> peak_flops('NVIDIA H100 80GB HBM3'), peak_flops('TPU v5 lite')
    (989000000000000.0, 197000000000000.0)
    >>> peak_flops('NVIDIA H100 PCIe'), peak_flops('cpu') is None
    (756000000000000.0, True)
"""

import re
from typing import Any

import jax

__all__ = ['PEAKS', 'peak_flops', 'flops_per_token', 'device_peak']

# Dense (no sparsity) bfloat16 peaks per device, first match wins
# (re.search on the lower-cased device_kind). Sources: NVIDIA's data sheets
# (they quote "with sparsity" figures, twice these) and the Cloud TPU
# system-architecture pages (per chip).
PEAKS: tuple[tuple[str, float, str], ...] = (
    (r'h100.*pcie', 756e12, 'NVIDIA H100 PCIe data sheet (1,513 sparse)'),
    (r'h100.*nvl', 835e12, 'NVIDIA H100 NVL data sheet (1,671 sparse)'),
    (r'h100|h800', 989e12, 'NVIDIA H100 SXM data sheet (1,979 sparse)'),
    (r'h200', 989e12, 'NVIDIA H200 data sheet (1,979 sparse)'),
    (r'a100|a800', 312e12, 'NVIDIA A100 data sheet (624 sparse)'),
    (r'l40s', 362e12, 'NVIDIA L40S data sheet (733 sparse)'),
    (r'l40\b', 181e12, 'NVIDIA L40 data sheet (362 sparse)'),
    (r'\bl4\b', 121e12, 'NVIDIA L4 data sheet (242 sparse)'),
    (r'\ba10\b', 125e12, 'NVIDIA A10 data sheet (250 sparse)'),
    (r'tpu v6 ?lite|tpu v6e', 918e12, 'Cloud TPU v6e (Trillium) docs'),
    (r'tpu v5 ?lite|tpu v5e', 197e12, 'Cloud TPU v5e docs'),
    (r'tpu v5p?\b', 459e12, 'Cloud TPU v5p docs'),
    (r'tpu v4', 275e12, 'Cloud TPU v4 docs'),
    (r'tpu v3', 123e12, 'Cloud TPU v3 docs'),
    (r'tpu v2', 45e12, 'Cloud TPU v2 docs'),
)


def peak_flops(device_kind: str) -> float | None:
  """The dense bfloat16 peak FLOP/s of one device of ``device_kind`` (as
  ``jax.Device.device_kind`` names it), or None when :data:`PEAKS` has no
  entry (the CPU, a device not listed)."""
  kind = str(device_kind).lower()
  for pattern, peak, _ in PEAKS:
    if re.search(pattern, kind):
      return peak
  return None


def device_peak(bound: float | None) -> tuple[float | None, str]:
  """``(peak per device, where it came from)``: ``bound``
  (``train.peak_flops_per_device``) if set, else the table's entry for
  this process's first device."""
  if bound is not None:
    return float(bound), 'train.peak_flops_per_device'
  kind = jax.devices()[0].device_kind
  return peak_flops(kind), f'device kind {kind!r}'


def flops_per_token(model: Any, seq_len: int | None) -> float | None:
  """Training FLOPs per token of ``model`` at ``seq_len`` (its own
  ``flops_per_token(seq_len, training=True)``), or None when the model does
  not count them or the sequence length is unknown."""
  count = getattr(model, 'flops_per_token', None)
  if not callable(count) or not seq_len:
    return None
  return float(count(int(seq_len), training=True))
