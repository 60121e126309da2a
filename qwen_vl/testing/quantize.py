"""4-bit weights for test checkpoints: round-to-nearest quantization and the two on-disk packings
that Qwen-VL-Chat's 4-bit releases use, written by the checkpoint tool (`checkpoint.py`).

Only the writer uses this module: serving reads these layouts through vLLM's own GPTQ and AWQ
configs and kernels (`quantization.py` says which facts of the layout it relies on, and where
they come from). Everything here works on one linear layer's float weight `[out, in]`, as
`nn.Linear` stores it, and on integers held in int64 until they are packed.

GPTQ (AutoGPTQ, symmetric, "v1" zero points), per group of `group_size` inputs and each output:
scale = 2 max|w| / 15, q = clamp(round(w / scale) + 8, 0, 15), w' = scale (q - 8). On disk:
`qweight` int32 [in / 8, out], eight inputs per word, the lowest input in the lowest 4 bits;
`qzeros` int32 [in / group, out / 8], eight outputs per word, each holding zero - 1 (v1: 7 for
the symmetric zero 8); `scales` float16 [in / group, out]; `g_idx` int32 [in] = i // group.

AWQ (AutoAWQ "gemm", zero_point true), per group and output: scale = (max - min) / 15,
zero = clamp(round(-min / scale), 0, 15), q = clamp(round(w / scale) + zero, 0, 15),
w' = scale (q - zero). On disk: `qweight` int32 [in, out / 8] and `qzeros` int32
[in / group, out / 8], eight outputs per word in the order AWQ_ORDER (word slot j holds output
AWQ_ORDER[j] of its eight); `scales` float16 [in / group, out]; no `g_idx`.
"""

from dataclasses import dataclass

import torch

BITS = 4
MAX_Q = 2**BITS - 1
PER_WORD = 32 // BITS
# AutoAWQ's "gemm" packing: slot j of a word holds output AWQ_ORDER[j] of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
METHODS = ("gptq", "awq")


@dataclass
class QuantizedLinear:
    """One layer's integers and scales, before packing: q [out, in], zeros and scales [groups, out]."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor  # float16, as stored
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the stored integers and scales stand for."""
        groups = torch.arange(self.q.shape[1]) // self.group_size
        scales = self.scales.float()[groups].t()
        zeros = self.zeros[groups].t()
        return (scales * (self.q - zeros).float()).contiguous()


def check_shape(name: str, out_features: int, in_features: int, group_size: int) -> None:
    """Sizes both packings and vLLM's 4-bit CPU kernels need, refused naming the layer."""
    if in_features % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide its {in_features} inputs")
    if in_features % 32 or out_features % 32:
        raise ValueError(
            f"{name}: {out_features}x{in_features}: 4-bit layers need both widths to be multiples of 32 "
            "(vLLM's CPU kernels; eight values per packed word on either side)"
        )


def quantize(weight: torch.Tensor, method: str, group_size: int) -> QuantizedLinear:
    """Round-to-nearest 4-bit quantization of `weight` [out, in], per group of inputs."""
    out_features, in_features = weight.shape
    grouped = weight.float().reshape(out_features, in_features // group_size, group_size)
    if method == "gptq":
        scales = (grouped.abs().amax(-1) * 2 / MAX_Q).clamp_min(1e-8)
        scales = scales.to(torch.float16)  # stored in float16: quantize against what is stored
        zeros = torch.full_like(scales, (MAX_Q + 1) // 2, dtype=torch.int64)
    elif method == "awq":
        low, high = grouped.amin(-1).clamp_max(0), grouped.amax(-1).clamp_min(0)
        scales = ((high - low) / MAX_Q).clamp_min(1e-8).to(torch.float16)
        zeros = torch.round(-low / scales.float()).clamp(0, MAX_Q).to(torch.int64)
    else:
        raise ValueError(f"unknown quantization method {method!r}: one of {', '.join(METHODS)}")
    q = torch.round(grouped / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, MAX_Q).to(torch.int64).reshape(out_features, in_features)
    return QuantizedLinear(q, zeros.t().contiguous(), scales.t().contiguous(), group_size)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(PER_WORD))) -> torch.Tensor:
    """Eight 4-bit values along `dim` per int32 word; slot j (bits 4j..4j+3) holds value order[j]."""
    values = values.movedim(dim, -1)
    chunks = values.reshape(*values.shape[:-1], -1, PER_WORD)[..., list(order)]
    shifts = torch.arange(PER_WORD, dtype=torch.int64) * BITS
    words = (chunks.to(torch.int64) << shifts).sum(-1)
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(PER_WORD))) -> torch.Tensor:
    """The inverse of `pack`: int64 values, eight per word along `dim`."""
    words = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PER_WORD, dtype=torch.int64) * BITS
    slots = (words.unsqueeze(-1) >> shifts) & MAX_Q
    values = torch.empty_like(slots)
    values[..., list(order)] = slots
    return values.reshape(*words.shape[:-1], -1).movedim(-1, dim).contiguous()


def packed_tensors(layer: QuantizedLinear, method: str) -> dict[str, torch.Tensor]:
    """The layer's tensors as the method stores them, by suffix (`qweight`, `qzeros`, ...)."""
    if method == "gptq":
        return {
            "qweight": pack(layer.q.t(), dim=0),
            "qzeros": pack(layer.zeros - 1, dim=1),  # AutoGPTQ's v1 convention: zero - 1
            "scales": layer.scales,
            "g_idx": (torch.arange(layer.q.shape[1]) // layer.group_size).to(torch.int32),
        }
    return {
        "qweight": pack(layer.q.t(), dim=1, order=AWQ_ORDER),
        "qzeros": pack(layer.zeros, dim=1, order=AWQ_ORDER),
        "scales": layer.scales,
    }


def unpacked(tensors: dict[str, torch.Tensor], method: str, group_size: int) -> QuantizedLinear:
    """The integers and scales back from a layer's stored tensors (the writer's round trip)."""
    if method == "gptq":
        q = unpack(tensors["qweight"], dim=0).t()
        zeros = unpack(tensors["qzeros"], dim=1) + 1
    else:
        q = unpack(tensors["qweight"], dim=1, order=AWQ_ORDER).t()
        zeros = unpack(tensors["qzeros"], dim=1, order=AWQ_ORDER)
    return QuantizedLinear(q.contiguous(), zeros, tensors["scales"], group_size)
