"""On a CPU without bfloat16 product instructions, bfloat16 products are computed in float32 and
rounded once (qwen_vl/model_executor/cpu_products.py). Such a CPU is simulated where the machine
has them, by making `native_bfloat16_products` answer False."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_vl.model_executor import cpu_products
from tests.helpers import child_result

PRODUCTS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "conv2d", "convolution"}


class ProductDtypes(TorchDispatchMode):
    """Records, for each aten product and each of our float32 linear ops, the dtypes of its tensor operands."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PRODUCTS or name == "float32_linear":
            self.calls.append((name, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_bfloat16_products(monkeypatch):
    monkeypatch.setattr(cpu_products, "native_bfloat16_products", lambda: False)


def operands(rows: int, width: int = 96, outputs: int = 80):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=generator).bfloat16()
    weight = (torch.randn(outputs, width, generator=generator) / width**0.5).bfloat16()
    bias = torch.randn(outputs, generator=generator).bfloat16()
    return x, weight, bias


def test_a_product_of_many_rows_sums_in_float32_and_rounds_once(no_bfloat16_products, monkeypatch):
    monkeypatch.setattr(cpu_products, "SLICE_BYTES", 4 * 96 * 24)  # 24 output columns a slice: 4 slices of 80
    x, weight, bias = operands(cpu_products.WIDEN_FROM_ROWS)
    with ProductDtypes() as seen:
        got = cpu_products.linear(x.view(2, -1, 96), weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (2, cpu_products.WIDEN_FROM_ROWS // 2, 80)
    want = F.linear(x.float(), weight.float(), bias.float()).bfloat16().view(2, -1, 80)
    # float32 sums rounded to bfloat16 once: at most one bfloat16 step from the float32 result.
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert seen.calls == [("float32_linear", ("torch.bfloat16",) * 3)]


def test_a_product_of_few_rows_stays_in_bfloat16(no_bfloat16_products):
    x, weight, bias = operands(cpu_products.WIDEN_FROM_ROWS - 1)
    assert torch.equal(torch.ops.qwen_vl.float32_linear(x, weight, bias), F.linear(x, weight, bias))


def test_matmul_and_convolution_multiply_bfloat16_operands_in_float32_and_leave_float32_alone(no_bfloat16_products):
    a, b = torch.randn(3, 40, 16).bfloat16(), torch.randn(3, 16, 40).bfloat16()
    pixels, kernel = torch.randn(1, 3, 28, 28).bfloat16(), torch.randn(8, 3, 14, 14).bfloat16()
    with ProductDtypes() as seen:
        product = cpu_products.matmul(a, b)
        patches = cpu_products.conv2d(pixels, kernel, 14)
        cpu_products.matmul(a.float(), b.float())
    assert product.dtype == patches.dtype == torch.bfloat16 and patches.shape == (1, 8, 2, 2)
    assert [dtypes for _, dtypes in seen.calls] == [("torch.float32", "torch.float32")] * 3
    torch.testing.assert_close(product, (a.float() @ b.float()).bfloat16(), rtol=2**-7, atol=1e-6)


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.nn.functional as F
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from qwen_vl.benchmarks import vision
    from qwen_vl.model_executor import cpu_products
    from tests.test_cpu_products import ProductDtypes, operands

    vision.init_vllm_single_rank()
    out = {}

    def linear_layer():
        with set_current_vllm_config(VllmConfig()):
            layer = ReplicatedLinear(96, 80, bias=True, params_dtype=torch.bfloat16)
        x, weight, bias = operands(64)
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        layer.quant_method.process_weights_after_loading(layer)
        return layer, x, F.linear(x.float(), weight.float(), bias.float())

    # As vLLM leaves a bfloat16 layer on this CPU.
    layer, _, _ = linear_layer()
    out["this_cpu"] = {"has_cpu_linear": hasattr(layer, "cpu_linear"), "weight_kept": layer.weight.numel() == 96 * 80,
                       "widened": cpu_products.use_float32_products(torch.nn.Sequential(layer))}

    # A CPU without bfloat16 products, simulated: vLLM leaves every bfloat16 layer to torch's F.linear.
    cpu_products.native_bfloat16_products = lambda: False
    utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: setattr(layer, "cpu_linear", F.linear)

    layer, x, want = linear_layer()
    widened = cpu_products.use_float32_products(torch.nn.Sequential(layer))
    with torch.inference_mode(), ProductDtypes() as seen:
        got, _ = layer(x)
    out["layer"] = {"widened": widened, "calls": seen.calls, "max_abs": (got.float() - want).abs().max().item(),
                    "scale": want.abs().max().item()}

    ours, reference = vision.build_models(*vision.checkpoint_visual(Path(sys.argv[1])), torch.bfloat16)
    float32_reference = reference.float()
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), ProductDtypes() as seen:
        got = ours(pixels.bfloat16())
    with torch.inference_mode():
        want = float32_reference(pixels.bfloat16().float())
    out["tower"] = {"calls": seen.calls, "dtype": str(got.dtype), "max_abs": (got.float() - want).abs().max().item(),
                    "scale": want.abs().max().item()}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def in_vllm(tiny_checkpoint):
    """Results of CHILD, run in a child process: vLLM's parallel layers need a one-rank vLLM
    distributed state, which must not leak into the engines other tests start."""
    return child_result(CHILD, str(tiny_checkpoint))


def test_vllm_linear_layers_call_the_product_we_give_them(in_vllm):
    """The private hook: vLLM's unquantized method on a CPU calls `layer.cpu_linear`."""
    layer = in_vllm["layer"]
    assert layer["widened"] == 1
    assert layer["calls"] == [["float32_linear", ["torch.bfloat16"] * 3]]
    assert layer["max_abs"] <= 2**-7 * layer["scale"]


@pytest.mark.skipif(cpu_products.native_bfloat16_products(), reason="this CPU has bfloat16 products: vLLM packs "
                    "bfloat16 weights for its own kernels here, and nothing is widened")
def test_on_this_cpu_vllm_leaves_bfloat16_layers_to_torchs_linear_and_we_widen_them(in_vllm):
    """The other half of the hook: vLLM's `dispatch_cpu_unquantized_gemm` sets `cpu_linear` and
    keeps the weight where it has no bfloat16 kernel."""
    assert in_vllm["this_cpu"] == {"has_cpu_linear": True, "weight_kept": True, "widened": 1}


def test_the_visual_tower_computes_every_product_in_float32(in_vllm):
    """The whole tower in bfloat16 on a (simulated) CPU without bfloat16 products: no product
    multiplies bfloat16 operands, and the features are the float32 tower's to bfloat16 precision."""
    tower = in_vllm["tower"]
    assert tower["dtype"] == "torch.bfloat16"
    names = [name for name, _ in tower["calls"]]
    # The tiny preset: 2 ViT blocks, each 4 linear layers and 2 attention products; the adapter's
    # key projection, its q, k, v and output projections and 2 attention products; the patch
    # embedding and the final projection.
    assert names.count("float32_linear") == 2 * 4 + 5
    assert names.count("conv2d") == 1 and names.count("matmul") == 2 * 2 + 2 + 1 and len(names) == 13 + 1 + 7
    assert all(set(dtypes) == {"torch.float32"} for name, dtypes in tower["calls"] if name != "float32_linear")
    assert tower["scale"] > 0.1
    assert tower["max_abs"] < 0.05 * tower["scale"]
