"""Weight-only quantization by hand (int8 per output channel, int4 in groups), half precision, torch's own int8.

    q, scale = quantize_per_channel(w)            # int8, one scale per output row: |w - q * scale| <= scale / 2
    packed, scale = quantize_groupwise(w, 4, 32)  # two 4-bit values per byte, one scale per 32 inputs of a row
    int8 = quantize_model(model, bits=8)          # a copy: the blocks' Linear layers and the tied embedding / head
    int4 = quantize_model(model, bits=4, group_size=32)
    torch_int8(model), cast(model, torch.bfloat16), model_bytes(int8)

Only the weights are stored in integers; every forward dequantizes them to the input's dtype and runs an ordinary
``F.linear``, so the activations (and the arithmetic) stay float: the gain is memory (and memory bandwidth), not
integer matmuls. The quantized modules keep the names and call signatures of the ones they replace (``qkv``,
``proj``, ``fc``, ``lm_head``, ``tok_emb``), so KV-cached generation runs them unchanged. The tied token matrix is
stored once: the lm_head holds its integers and per-row scales, and the embedding looks up rows of that same
matrix (a row's scale serves as the embedding row's scale and as the head's output-channel scale). LayerNorms,
biases and the position embedding stay float.

Symmetric scales (zero point 0): ``scale = max|w| / qmax`` with qmax = 127 (int8) or 7 (int4); the most negative
code (-128, -8) is unused, so q and -q are both representable.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.measure.memory import storage_bytes

__all__ = ["quantize_per_channel", "dequantize", "pack_int4", "unpack_int4", "quantize_groupwise",
           "dequantize_groupwise", "Int8Linear", "Int4Linear", "QuantizedEmbedding", "quantize_model",
           "torch_int8", "cast", "model_bytes"]

_TINY = 1e-12  # an all-zero row still gets a usable scale (its codes are all 0)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 of w's shape, scale float32 (rows, 1)): symmetric, one scale per output row (dim 0)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: per-channel codes are stored in int8, so bits must be in 2..8")
    w = w.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=_TINY) / _qmax(bits)
    q = torch.round(w / scale).clamp(-_qmax(bits), _qmax(bits)).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in -8..7 (last dim even) → uint8 with half the last dim: column 2i in the low nibble, 2i+1 high."""
    if q.size(-1) % 2:
        raise ValueError(f"the last dim ({q.size(-1)}) must be even to pack two 4-bit values per byte")
    offset = (q.to(torch.int16) + 8).to(torch.uint8)  # -8..7 → 0..15: nibbles hold no sign
    return offset[..., 0::2] | (offset[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 codes in -8..7, the last dim twice as long."""
    low, high = packed & 0x0F, packed >> 4
    return (torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8) - 8)


def quantize_groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (rows, cols / 2), scale float32 (rows, cols / group_size)): symmetric 4-bit codes, one scale
    per ``group_size`` consecutive inputs of a row. |w - dequantize_groupwise| <= that group's scale / 2."""
    if not 2 <= bits <= 4:
        raise ValueError(f"bits={bits}: two codes are packed per byte, so bits must be in 2..4")
    rows, cols = w.shape
    if cols % group_size or group_size % 2:
        raise ValueError(f"{cols} inputs do not split into groups of {group_size}: pick an even group_size that "
                         f"divides {cols} (e.g. 32 or 64)")
    groups = w.detach().float().reshape(rows, cols // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / _qmax(bits)
    q = torch.round(groups / scale).clamp(-_qmax(bits), _qmax(bits)).reshape(rows, cols)
    return pack_int4(q), scale.squeeze(-1)


def dequantize_groupwise(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Float weights (..., cols) from packed codes (..., cols / 2) and group scales (..., groups); any leading
    dims, so a gathered set of rows (an embedding lookup) dequantizes the same way as the whole matrix."""
    q = unpack_int4(packed).to(dtype)
    groups = q.unflatten(-1, (scale.size(-1), -1))
    return (groups * scale.to(dtype).unsqueeze(-1)).flatten(-2)


class _WeightOnlyLinear(nn.Module):
    """A Linear whose weight is kept quantized; subclasses store it and give it back with ``dequantized(dtype)``.
    The bias stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix, read like nn.Linear's (generation asks it for the device)."""
        return self.dequantized(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightOnlyLinear):
    """int8 weight with one float32 scale per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight.size(1), qweight.size(0), bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_per_channel(linear.weight), linear.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` dequantized (in the scales' dtype): an embedding lookup."""
        return dequantize(self.qweight[idx], self.scale[idx], self.scale.dtype)


class Int4Linear(_WeightOnlyLinear):
    """4-bit weight, two codes per byte, with one float32 scale per ``group_size`` inputs of each row."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(packed.size(1) * 2, packed.size(0), bias)
        self.group_size = self.in_features // scale.size(1)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        return cls(*quantize_groupwise(linear.weight, 4, group_size), linear.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_groupwise(self.packed, self.scale, dtype)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return dequantize_groupwise(self.packed[idx], self.scale[idx], self.scale.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """A token embedding over a quantized (vocab, n_embd) matrix (an Int8Linear or Int4Linear), dequantizing only
    the rows looked up. Tied: the matrix is the lm_head's, referenced but not registered here, so the model holds,
    saves and moves it once, as the lm_head (registered buffers would be copied apart by ``.to()``)."""

    def __init__(self, matrix: Int8Linear | Int4Linear, tied: bool = False):
        super().__init__()
        self.tied = tied
        if tied:
            self.__dict__["tied_matrix"] = matrix  # past nn.Module's registration
        else:
            self.matrix = matrix

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 8, group_size: int = 32) -> QuantizedEmbedding:
        as_linear = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        as_linear.weight = embedding.weight  # the same (vocab, n_embd) layout: rows are tokens
        return cls(_quantized_linear(as_linear, bits, group_size))

    @property
    def source(self) -> Int8Linear | Int4Linear:
        return self.__dict__["tied_matrix"] if self.tied else self.matrix

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.source.rows(idx)


def _quantized_linear(linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
    return Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size)


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 32) -> nn.Module:
    """A copy of the GPT with every Linear of its blocks and the tied embedding / lm_head quantized (``bits`` 8:
    per-channel int8; 4: group-wise int4). The original is untouched; LayerNorms, biases, pos_emb stay float."""
    if bits not in (8, 4):
        raise ValueError(f"bits={bits}: choose 8 (per-channel int8) or 4 (group-wise int4)")
    quantized = copy.deepcopy(model)
    for block in quantized.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quantized_linear(child, bits, group_size))
    head = _quantized_linear(quantized.lm_head, bits, group_size)
    if quantized.lm_head.weight is quantized.tok_emb.weight:
        quantized.tok_emb = QuantizedEmbedding(head, tied=True)
    else:
        quantized.tok_emb = QuantizedEmbedding.from_embedding(quantized.tok_emb, bits, group_size)
    quantized.lm_head = head
    return quantized


def torch_int8(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """A copy with torch's dynamic int8 (``quantize_dynamic``, qint8 weights; activations quantized on the fly)
    on the blocks' Linear layers. The tied lm_head stays float: quantizing it would give it its own int8 copy
    beside the float embedding (the matrix stored twice), and drop the ``lm_head.weight`` tensor generation reads.
    CPU only (torch's quantized kernels)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    quantized = copy.deepcopy(model).cpu()
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices, on every call
        warnings.simplefilter("ignore")
        quantized.blocks = quantize_dynamic(quantized.blocks, {nn.Linear: qconfig}, dtype=torch.qint8)
    return quantized


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """A copy with every float parameter and buffer in ``dtype`` (torch.bfloat16 or "bf16", fp16, fp32)."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    return copy.deepcopy(model).to(dtype)


def _packed_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What torch's quantized Linear keeps outside parameters and buffers: the int8 weight (1 byte per value),
    its scales and zero points (float64 / int64: per channel, or one each) and the float bias."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight, bias = module._weight_bias()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        qparams = [weight.q_per_channel_scales(), weight.q_per_channel_zero_points()]
    else:
        qparams = [torch.tensor([weight.q_scale()], dtype=torch.float64),
                   torch.tensor([weight.q_zero_point()], dtype=torch.int64)]
    return [weight.int_repr(), *qparams] + ([bias] if bias is not None else [])


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (the tied matrix, shared quantized buffers),
    plus what torch's quantized Linear layers hold packed (:func:`_packed_tensors`)."""
    from torch.ao.nn.quantized import Linear as TorchQuantizedLinear

    held, seen = storage_bytes(list(model.parameters()) + list(model.buffers()))
    packed = [t for m in model.modules() if isinstance(m, TorchQuantizedLinear) for t in _packed_tensors(m)]
    return held + storage_bytes(packed, seen)[0]
