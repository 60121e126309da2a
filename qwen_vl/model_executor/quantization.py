"""4-bit checkpoints: Qwen-VL-Chat-Int4 (GPTQ) and AutoAWQ conversions, served by vLLM's own
quantization configs and kernels, which the checkpoint's `quantization_config` selects as for
vLLM's own models. This module holds what the plugin adds: the facts of the layout it relies
on, the checks that refuse at start what cannot run, and the checks of the tensors vLLM's
layers do not take.

The layout, and where each fact comes from (re-read for this module, 2026-12-06):
- Qwen quantized Qwen-VL-Chat with AutoGPTQ (a fork named in the Qwen-VL README's
  "Quantization" section): bits 4, group_size 128, desc_act false, sym true, damp 0.01
  (QwenLM/Qwen `run_gptq.py`'s `BaseQuantizeConfig`); the model loads with a plain
  `from_pretrained`, so config.json carries `quantization_config` with `quant_method: gptq`.
- Quantized: each decoder block's `attn.c_attn`, `attn.c_proj`, `mlp.w1`, `mlp.w2`,
  `mlp.c_proj` (AutoGPTQ `auto_gptq/modeling/qwen.py`, `inside_layer_modules`); left in float16:
  `transformer.wte`, `ln_f`, `transformer.visual` (its `outside_layer_modules`, the visual tower
  added 2023-08-30 for Qwen-VL), the blocks' norms and `lm_head` (AutoGPTQ 0.4 never quantizes it).
- Each quantized layer stores `qweight` int32 [in/8, out] (input 8r+k in bits 4k..4k+3 of row r),
  `qzeros` int32 [in/group, out/8] (packed along outputs the same way), `scales` float16
  [in/group, out], `g_idx` int32 [in] = i // group_size, and `bias` float16 [out]
  (AutoGPTQ `qlinear_cuda_old.py`, `pack` and its buffers).
- Zero points follow AutoGPTQ's "v1" convention: `pack` stores zero - 1, so the symmetric zero 8
  is stored as 7 (every qzeros word 0x77777777), and w = scale * (q - (stored + 1)).
- AutoGPTQ up to 0.7 built every quantized layer with a bias (`make_quant`, `_utils.py`), so the
  four layers that have none in Qwen carry an all-zero bias; transformers reports exactly those
  four as unused when it loads Qwen-VL-Chat-Int4 (QwenLM/Qwen-VL issue 433, which also shows 5
  shards). Only `c_attn`'s bias is real.
- AWQ (AutoAWQ `WQLinear_GEMM`, `quant_method: awq`, `version: gemm`, `zero_point: true`):
  `qweight` int32 [in, out/8] and `qzeros` int32 [in/group, out/8], eight outputs per word in the
  order 0, 2, 4, 6, 1, 3, 5, 7; zeros stored as they are; `scales` float16 [in/group, out]; no
  `g_idx`, a bias only where the layer has one.
Not confirmed from the published files themselves (no copy reachable here): the exact
`quantization_config` block of Qwen-VL-Chat-Int4, its shard file names, and its `torch_dtype`
(float16 by every hint: AutoGPTQ 0.4 stores scales and biases in half precision).

What vLLM 0.32 does with them (`layers/quantization/auto_gptq.py`, `auto_awq.py`): `gptq` maps to
AutoGPTQConfig (4 or 8 bits, symmetric only; desc_act refused), which ignores `qzeros` (the kernels
take the symmetric zero 8) and drops `g_idx` (`QuantizationConfig.get_checkpoint_weight_mapper`);
`awq` to AutoAWQConfig (4 bits, zero points). Both find the quantized layers from the safetensors
dtypes, so the float16 visual tower stays unquantized, and both pick a kernel with
`choose_mp_linear_kernel` (on CPUs: zentorch's or CPUWNA16; on GPUs: Marlin and others).
Our `load_weights` gives `g_idx`, `qzeros` and the zero biases to `checked_extra`, which
verifies what vLLM would silently assume: a `g_idx` that is i // group_size, zero points of 8,
biases that are zero.
"""

import os

import torch

GPTQ_ZERO = 8  # the symmetric 4-bit zero vLLM's GPTQ kernels (uint4b8) assume
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def method(quant) -> str | None:
    """"gptq", "awq" or None: the method of vLLM's quantization config `quant`."""
    if quant is None:
        return None
    name = quant.get_name()
    if "gptq" in name:
        return "gptq"
    if "awq" in name:
        return "awq"
    return name


def layer_shapes(hf_config, tensor_parallel_size: int) -> dict[str, tuple[int, int, int, int]]:
    """Each quantized layer kind -> (full input, full output, input and output per rank)."""
    hidden = hf_config.hidden_size
    projection = hf_config.num_attention_heads * hf_config.kv_channels
    ff = hf_config.intermediate_size // 2
    tp = tensor_parallel_size
    return {
        "attn.c_attn": (hidden, 3 * projection, hidden, 3 * projection // tp),
        "attn.c_proj": (projection, hidden, projection // tp, hidden),
        "mlp.w2 + mlp.w1": (hidden, 2 * ff, hidden, 2 * ff // tp),
        "mlp.c_proj": (ff, hidden, ff // tp, hidden),
    }


def check_quantization(vllm_config) -> None:
    """Refuse, before any worker starts, a quantized checkpoint the workers could not run: the
    kernels vLLM would pick for each layer are asked now, with the same rules, and a layer none
    of them takes is named with vLLM's reasons; then a kernel whose product vLLM's build for this
    CPU lacks (`has_cpu_gemm_wna16`) is refused, naming that product."""
    from vllm.config import VllmConfig

    # vLLM builds its quantization config after the per-architecture hook that calls this; the
    # same public builder, on a copy of the model config, gives the one it will build.
    quant = vllm_config.quant_config or VllmConfig.get_quantization_config(vllm_config.model_config, vllm_config.load_config)
    kind = method(quant)
    if kind not in ("gptq", "awq"):
        if kind is not None:
            raise ValueError(f"quantization {kind!r} is not served for Qwen-VL: use a GPTQ (Qwen-VL-Chat-Int4) or AWQ checkpoint")
        return
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.platforms import current_platform

    group_size = quant.group_size
    if kind == "gptq":
        from vllm.model_executor.layers.quantization.utils.marlin_utils import verify_marlin_supported

        try:  # what AutoGPTQLinearMethod asks in each worker
            verify_marlin_supported(quant.quant_type, group_size)
        except ValueError as error:
            raise ValueError(
                f"GPTQ checkpoint with bits={quant.weight_bits}, group_size={group_size} cannot run on "
                f"{current_platform.device_name}: {error}"
            ) from None
    elif not current_platform.is_cpu() and not current_platform.is_xpu():
        return  # AWQ on GPUs falls back to kernels that choose_mp_linear_kernel does not describe
    act_type = vllm_config.model_config.dtype
    tp = vllm_config.parallel_config.tensor_parallel_size
    shapes = layer_shapes(vllm_config.model_config.hf_config, tp)
    kernels = set()
    with set_current_vllm_config(vllm_config):
        for layer, (full_in, full_out, part_in, part_out) in shapes.items():
            per_rank_group = group_size if group_size != -1 else part_in
            if part_in % per_rank_group:
                raise ValueError(
                    f"{layer}: {part_in} inputs per rank (tensor parallel size {tp}) do not split into groups of "
                    f"{group_size}: choose a tensor parallel size that keeps each rank's share a whole number of groups"
                )
            layer_config = MPLinearLayerConfig(
                full_weight_shape=(full_in, full_out), partition_weight_shape=(part_in, part_out),
                weight_type=quant.quant_type, act_type=act_type, group_size=group_size,
                zero_points=kind == "awq",
            )
            try:
                kernels.add(choose_mp_linear_kernel(layer_config))
            except ValueError as error:
                raise ValueError(
                    f"{kind.upper()} layer {layer} ({part_in} inputs x {part_out} outputs per rank, group_size "
                    f"{group_size}, {act_type}) has no 4-bit kernel on {current_platform.device_name}: {error}"
                ) from None
    if any(needs_cpu_gemm_wna16(kernel) for kernel in kernels) and not has_cpu_gemm_wna16():
        raise ValueError(
            f"{kind.upper()} checkpoint cannot run on this CPU: vLLM's kernels built for it lack the 4-bit "
            f"product its layers call (torch.ops._C.{CPU_4_BIT_OP}; vLLM's x86 wheel has it in its AVX-512 "
            f"builds only): serve the 16-bit checkpoint (Qwen/Qwen-VL-Chat) here, or this one on a CPU with "
            f"AVX-512 or a GPU"
        )


CPU_4_BIT_OP = "cpu_gemm_wna16"


def needs_cpu_gemm_wna16(kernel: type) -> bool:
    """Whether vLLM's 4-bit `kernel` may call `torch.ops._C.cpu_gemm_wna16`: its generic CPU kernel
    does, and zentorch's falls back to it for a layout its own path does not take (AWQ's)."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

    return issubclass(kernel, CPUWNA16LinearKernel)


def has_cpu_gemm_wna16() -> bool:
    """Whether vLLM's kernels built for this CPU register its 4-bit product. vLLM 0.32's CPU wheel
    holds three builds and loads one by the CPU's instructions (`CpuPlatform.import_kernels`):
    `_C` (AVX-512 BF16) and `_C_AVX512` register `cpu_gemm_wna16`, `_C_AVX2` does not (its symbol
    table, checked 2026-12-07), so on an x86 CPU without AVX-512 every 4-bit layer died in the
    worker at its first product ("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, CPU_4_BIT_OP)


W4A8_ENV = "VLLM_CPU_INT4_W4A8"


def keep_16_bit_activations(vllm_config) -> None:
    """On CPUs, 4-bit layers multiply 16-bit activations, as the original does, unless the user
    set VLLM_CPU_INT4_W4A8 themselves.

    vLLM 0.32 defaults VLLM_CPU_INT4_W4A8 to 1: zentorch's kernel then quantizes each token's
    activations to 8 bits (`zentorch_dynamic_qlinear`, DA8W4) for symmetric 4-bit layers. The
    original (AutoGPTQ) multiplies float16 activations by the dequantized weights. Measured
    2026-12-06 on the tiny GPTQ checkpoint against the reference on the dequantized weights: with
    int8 activations the top log-probabilities differed by up to 0.073, over the 0.05 our 16-bit
    path keeps (tests/test_quantized.py); with 16-bit activations (`zentorch_woq_linear`) by 0.035,
    decoding as fast on the full-size model and prefilling 1.5x slower (BENCHMARKS.md). Set in the
    process that builds the engine's config, before any worker starts: the workers inherit it and
    vLLM reads it when it hands each layer to its kernel."""
    from vllm.platforms import current_platform

    if vllm_config.model_config.quantization is not None and current_platform.is_cpu():
        os.environ.setdefault(W4A8_ENV, "0")


def checked_extra(name: str, tensor: torch.Tensor, quant_config, has_bias: bool) -> bool:
    """True for a checkpoint tensor that vLLM's layers do not take but that is consistent with
    what they compute (then it is not loaded); raises for one that contradicts it."""
    group_size = getattr(quant_config, "group_size", None)
    if name.endswith(".g_idx"):
        expected = torch.arange(tensor.numel(), dtype=torch.int64) // (group_size if group_size != -1 else tensor.numel())
        if not torch.equal(tensor.to(torch.int64), expected):
            raise ValueError(f"{name}: activation-ordered groups (desc_act); vLLM's GPTQ layers take i // group_size only")
        return True
    if name.endswith(".bias") and not has_bias:
        if torch.count_nonzero(tensor):
            raise ValueError(f"{name}: a nonzero bias on a layer that has none in Qwen-VL")
        return True
    return False


def check_zero_points(name: str, tensor: torch.Tensor) -> None:
    """GPTQ's symmetric zero points, stored as 7 (AutoGPTQ's v1) or 8 (GPTQModel's v2) in every
    4 bits: vLLM's kernels take 8 and do not read the tensor, so any other value is refused."""
    words = tensor.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)])
    stored = set(nibbles.unique().tolist())
    if stored not in ({GPTQ_ZERO - 1}, {GPTQ_ZERO}):
        raise ValueError(
            f"{name}: zero points {sorted(stored)}; vLLM's GPTQ kernels take symmetric weights (zero point 8, "
            "stored as 7 by AutoGPTQ)"
        )


def gptq_in_zentorch_layout(model: torch.nn.Module) -> None:
    """GPTQ layers that vLLM gave zentorch's 4-bit kernel, turned to the orientation that kernel's
    fast path takes. Called at the end of `load_weights`, before vLLM's
    `process_weights_after_loading` hands each layer to its kernel.

    zentorch's kernel (`ZentorchWNA16LinearKernel`, chosen on AMD Zen CPUs) repacks a layer for
    `zentorch_woq_linear` only when its packed weight is laid out as compressed-tensors stores it,
    [outputs, inputs/8] packed along the inputs, with scales [outputs, groups]; GPTQ's
    [inputs/8, outputs] and [groups, outputs] fall through to the generic `cpu_gemm_wna16`, which
    decoded the full-size Int4 model at 398-406 ms a step where the fast path takes 186-191 ms
    (BENCHMARKS.md, same session). The two layouts hold the same words: GPTQ packs inputs 8r..8r+7 into bits
    4k..4k+3 of row r, compressed-tensors packs them the same way along a row, so the transpose
    of `qweight` is compressed-tensors' packed weight. Both read a stored 4-bit q as q - 8 (GPTQ's
    uint4b8, compressed-tensors' unpacking offset), so the kernel computes the same weights.
    Other kernels (Marlin, CPUWNA16 on other CPUs) and AWQ's layout (packed along the outputs)
    are left as they are."""
    from vllm.model_executor.kernels.linear.mixed_precision.zentorch import ZentorchWNA16LinearKernel

    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
        if not isinstance(kernel, ZentorchWNA16LinearKernel):
            continue
        qweight, scales = getattr(module, kernel.w_q_name), getattr(module, kernel.w_s_name)
        if getattr(qweight, "input_dim", None) != 0 or getattr(qweight, "packed_dim", None) != 0 or scales.dim() != 2:
            continue
        for name, tensor in ((kernel.w_q_name, qweight), (kernel.w_s_name, scales)):
            turned_param = torch.nn.Parameter(tensor.data.t().contiguous(), requires_grad=False)
            turned_param.input_dim, turned_param.output_dim = 1, 0
            if name == kernel.w_q_name:
                turned_param.packed_dim = 1
            setattr(module, name, turned_param)
            tensor.data = torch.empty(0, dtype=tensor.dtype)  # whoever still holds the old parameter
