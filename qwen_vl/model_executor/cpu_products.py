"""bfloat16 products on CPUs that have no bfloat16 product instructions.

On an x86 CPU without AVX-512 (AVX2 only: AMD Zen 1-3, most Intel desktops and laptops) neither
oneDNN nor torch has a bfloat16 product kernel. vLLM's oneDNN linear cannot be built there ("could
not create a primitive descriptor") and every linear layer falls back to torch's `F.linear`, which
converts as it multiplies; torch's own `mm`/`bmm` of bfloat16 is slower still. On a 2-core AMD
Zen 3 (2026-12-07): `F.linear` 17-21 GFLOP/s in bfloat16 at the real model's shapes against
94-143 in float32; two of the real ViT's 48 layers and the adapter took 56 s for one image, 30 s
of it in the adapter's `mm`s at under 1 GFLOP/s. A bfloat16 model served there spends its whole
prefill in these products.

So there, on the CPU and in bfloat16, each product is computed as a bfloat16 kernel with float32
accumulation computes it: operands widened to float32, multiplied and summed in float32, the
result rounded to bfloat16 once. The weights stay bfloat16 in memory (the 16-bit checkpoint needs
its 19.3 GB as they are); a linear layer widens its weight 16 MB at a time, each slice multiplied
while it is in cache, as slice @ x^T: MKL's float32 product of 4 to 64 rows is 1.1-2.8x faster that
way round than as x @ slice^T (F.linear), e.g. 45-59 against 27-30 GFLOP/s at 16 rows. With fewer
than `WIDEN_FROM_ROWS` rows (a decode step of fewer than 8 sequences) widening the weight costs
more than it saves, and torch's bfloat16 product runs. Measured on the real model's weights
(4096 wide, 4096 to 37,984 outputs; 11,008 wide, 4096 outputs), GFLOP/s, torch's bfloat16
against widened, 2026-12-07: 1 row 18-20 against 7-9; 4 rows 19-21 against 19-26; 8 rows 20-22
against 24-43; 16 rows 22 against 56-69; 32 rows 22 against 77-92; 128 rows 115-139 and 1024
rows 141-156 widened (torch's bfloat16 product stays at 18-22 however many rows).

Where it applies:
- vLLM's linear layers (the decoder's, the ViT's, the LM head) that fell back to `F.linear`:
  `use_float32_products` (the model's post-load hook) sets their `cpu_linear`, the function
  vLLM's unquantized method calls, to the op behind `linear`. vLLM exposes no other way to choose a CPU
  layer's product; `tests/test_cpu_products.py` fails if vLLM stops setting `cpu_linear` or
  calling it. `linear` runs a torch custom op, so the compiled decoder calls it as one opaque
  kernel and the row count is checked at every call, not traced once.
- The visual tower's own products (patch embedding, attention, adapter, projection) call
  `linear`, `matmul` and `conv2d` here.
Elsewhere (GPUs, CPUs with AVX-512, float32 models, 4-bit layers) nothing changes.
"""

import functools
import platform

import torch
import torch.nn.functional as F
from torch.library import Library
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

logger = init_logger("vllm.qwen_vl.cpu_products")  # under "vllm": its handlers print it in the engine's processes

WIDEN_FROM_ROWS = 8
SLICE_BYTES = 16 << 20  # one float32 slice of a weight


@functools.cache
def native_bfloat16_products() -> bool:
    """Whether this CPU multiplies bfloat16 at speed: false on x86 without AVX-512, where torch
    and oneDNN only emulate it (on a 2-core Zen 3, torch.mm ran at 0.3-0.9 GFLOP/s in bfloat16
    against 138-156 in float32)."""
    return platform.machine() != "x86_64" or torch.cpu._is_avx512_supported()


def widened(x: torch.Tensor) -> bool:
    """Whether a product with `x` as its first operand is computed in float32 (module docstring)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bfloat16_products()


def _float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    width, outputs = x.shape[-1], weight.shape[0]
    rows = x.numel() // width
    if rows < WIDEN_FROM_ROWS:
        return F.linear(x, weight, bias)
    columns = x.reshape(rows, width).float().t()
    out = torch.empty(rows, outputs, dtype=x.dtype)
    step = max(1, SLICE_BYTES // (4 * width))
    for start in range(0, outputs, step):
        part = slice(start, start + step)
        product = torch.mm(weight[part].float(), columns)  # (slice, rows): MKL's fast shape here
        if bias is not None:
            product += bias[part].float()[:, None]
        out[:, part] = product.t()
    return out.view(*x.shape[:-1], outputs)


def _float32_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_library = Library("qwen_vl", "FRAGMENT")
direct_register_custom_op("float32_linear", _float32_linear, fake_impl=_float32_linear_shape, target_lib=_library)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), in float32 where `widened(x)` (from `WIDEN_FROM_ROWS` rows)."""
    if widened(x):
        return torch.ops.qwen_vl.float32_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, in float32 where `widened(a)`."""
    if widened(a):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int | tuple[int, int]) -> torch.Tensor:
    """F.conv2d without bias or padding, in float32 where `widened(x)`."""
    if widened(x):
        return F.conv2d(x.float(), weight.float(), stride=stride).to(x.dtype)
    return F.conv2d(x, weight, stride=stride)


def use_float32_products(model: torch.nn.Module) -> int:
    """Point every vLLM layer of `model` that multiplies bfloat16 weights with torch's `F.linear`
    on a CPU without bfloat16 products at the op behind `linear`; returns how many. Layers whose weight vLLM
    packed for a kernel of its own (oneDNN, zentorch, 4-bit) keep it."""
    if not current_platform.is_cpu() or native_bfloat16_products():
        return 0
    layers = [module for module in model.modules()
              if hasattr(module, "cpu_linear") and isinstance(getattr(module, "weight", None), torch.Tensor)
              and module.weight.dtype == torch.bfloat16 and module.weight.dim() == 2 and module.weight.numel() > 0]
    for layer in layers:
        layer.cpu_linear = torch.ops.qwen_vl.float32_linear  # the op itself: the compiled decoder traces this call
    if layers:
        logger.info("this CPU has no bfloat16 product instructions: %d linear layers multiply in float32 "
                    "from %d rows, their weights kept in bfloat16", len(layers), WIDEN_FROM_ROWS)
    return len(layers)
