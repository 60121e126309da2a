"""4-bit checkpoints: Qwen-VL-Chat-Int4's GPTQ layout and AutoAWQ's, written by the checkpoint
tool, served through vLLM's own quantization configs and kernels, against the reference running
the same weights dequantized (float32).

vLLM's 4-bit layers take 16-bit activations only, so the engines here run at what `--dtype auto`
picks for these float16 checkpoints: float16 where the platform computes in it (vLLM's CpuPlatform
on x86), bfloat16 where it does not (ZenCpuPlatform on AMD CPUs). The bar is the one our 16-bit
path reaches on an unquantized checkpoint: every served token is the reference's greedy choice
given the same prefix, or within its rounding of it, and every step's top log-probabilities are
within that rounding (the tolerances below, with what was measured)."""

import gc
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform

from qwen_vl.benchmarks.harness import Server, free_port
from qwen_vl.model_executor import quantization
from qwen_vl.model_executor.quantization import check_zero_points, checked_extra
from qwen_vl.testing import quantize
from qwen_vl.testing.checkpoint import QUANTIZED_LINEARS, write_checkpoint
from qwen_vl.testing.reference import ReferenceQwenVL, read_checkpoint
from tests.helpers import API_KEY, CASE_NAMES, SERVED_MODEL, chat_answers, cpu_threads_bind, data_url, image_part, pattern_image, started

# Measured 2026-12-06 on an AMD EPYC (ZenCpuPlatform), the five parity cases on the tiny checkpoint,
# a bfloat16 engine against the float32 reference (float16, on x86 CpuPlatform, is closer).
# Unquantized (bfloat16 weights): top-20 log-probabilities of every step within 0.034, each served
# token at most 0.010 below the reference's best. GPTQ and AWQ (the reference on the dequantized
# weights): 0.038 and 0.027 with vLLM's generic CPU kernel (it dequantizes in bfloat16); GPTQ through
# zentorch's W4A16 kernel (the plugin's default on AMD CPUs): 0.035, each token at most 0.027 below
# the reference's best; the same with vLLM's own default of 8-bit activations (DA8W4): 0.073.
LOGPROB_TOLERANCE = 0.05
MARGIN_TOLERANCE = 0.05
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=20)


def serve(llm: LLM, prompt_ids: list[int], images: list):
    """`llm`'s 16 greedy tokens and each step's top log-probabilities."""
    request = {"prompt_token_ids": prompt_ids}
    if images:
        request["multi_modal_data"] = {"image": images}
    output = llm.generate([request], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == 16
    return list(output.token_ids), [{t: top.logprob for t, top in step.items()} for step in output.logprobs]


def assert_served_close_to_reference(prompt_ids, images, served, reference: ReferenceQwenVL) -> None:
    """Each served token checked against the reference given the same prefix."""
    tokens, logprobs = served
    with torch.inference_mode():
        expected = reference.logits(prompt_ids + tokens, images)[len(prompt_ids) - 1:-1].log_softmax(-1)
    for step, token in enumerate(tokens):
        margin = (expected[step].max() - expected[step, token]).item()
        assert margin <= MARGIN_TOLERANCE, f"step {step}: token {token} is {margin:.3f} below the reference's best"
        worst = max(abs(logprob - expected[step, t].item()) for t, logprob in logprobs[step].items())
        assert worst < LOGPROB_TOLERANCE, f"step {step}: log-probabilities differ by up to {worst:.3f}"


def assert_close_to_reference(llm: LLM, prompt_ids: list[int], images: list, reference: ReferenceQwenVL) -> None:
    assert_served_close_to_reference(prompt_ids, images, serve(llm, prompt_ids, images), reference)


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    """The tiny preset in Qwen-VL-Chat-Int4's layout, and its dequantized copy."""
    root = tmp_path_factory.mktemp("gptq")
    return write_checkpoint(root / "int4", preset="tiny", quantization="gptq", dequantized_dir=root / "dequantized")


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    return write_checkpoint(root / "int4", preset="tiny", quantization="awq", dequantized_dir=root / "dequantized")


@pytest.fixture(scope="module")
def gptq_reference(gptq_checkpoint):
    return ReferenceQwenVL.from_pretrained(gptq_checkpoint)


def shut_down(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# -- the writer ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", quantize.METHODS)
def test_writer_round_trips_the_integers_it_quantized(method):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    layer = quantize.quantize(weight, method, group_size=64)
    back = quantize.unpacked(quantize.packed_tensors(layer, method), method, group_size=64)
    assert torch.equal(back.q, layer.q) and torch.equal(back.zeros, layer.zeros)
    assert torch.equal(back.scales, layer.scales)
    assert layer.q.min() >= 0 and layer.q.max() <= 15 and len(layer.q.unique()) == 16
    # Round to nearest: no weight moves by more than half a step (plus float16 scale rounding).
    step = layer.scales.float().repeat_interleave(64, dim=0).t()
    assert ((layer.dequantize() - weight).abs() <= step * 0.5 + 1e-3).all()


def test_gptq_checkpoint_has_the_int4_layout(gptq_checkpoint):
    config = json.loads((gptq_checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert {k: config["quantization_config"][k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    tensors = read_checkpoint(gptq_checkpoint)
    hidden, ff = config["hidden_size"], config["intermediate_size"] // 2
    shapes = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.w1": (hidden, ff),
              "mlp.w2": (hidden, ff), "mlp.c_proj": (ff, hidden)}
    assert set(shapes) == set(QUANTIZED_LINEARS)
    for kind, (inputs, outputs) in shapes.items():
        layer = f"transformer.h.1.{kind}"
        assert f"{layer}.weight" not in tensors
        assert tensors[f"{layer}.qweight"].dtype == torch.int32 and tensors[f"{layer}.qweight"].shape == (inputs // 8, outputs)
        assert tensors[f"{layer}.qzeros"].dtype == torch.int32 and tensors[f"{layer}.qzeros"].shape == (inputs // 128, outputs // 8)
        assert (tensors[f"{layer}.qzeros"] == 0x77777777).all()  # AutoGPTQ's v1: the zero 8 stored as 7
        assert tensors[f"{layer}.scales"].dtype == torch.float16 and tensors[f"{layer}.scales"].shape == (inputs // 128, outputs)
        assert torch.equal(tensors[f"{layer}.g_idx"], torch.arange(inputs, dtype=torch.int32) // 128)
        assert tensors[f"{layer}.bias"].dtype == torch.float16 and tensors[f"{layer}.bias"].shape == (outputs,)
        assert bool(torch.count_nonzero(tensors[f"{layer}.bias"])) == (kind == "attn.c_attn")  # AutoGPTQ's zero biases
    unquantized = [name for name in tensors if not name.rsplit(".", 1)[0].endswith(tuple(QUANTIZED_LINEARS))]
    assert any(name.startswith("transformer.visual.") for name in unquantized)
    assert {tensors[name].dtype for name in unquantized} == {torch.float16}


@pytest.mark.parametrize("method", quantize.METHODS)
def test_reference_dequantizes_to_the_writers_dequantized_copy(method, tmp_path):
    quantized = write_checkpoint(tmp_path / "int4", preset="tiny", quantization=method, dequantized_dir=tmp_path / "plain")
    ours = ReferenceQwenVL.from_pretrained(quantized).state_dict()
    plain = ReferenceQwenVL.from_pretrained(tmp_path / "plain").state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[name], plain[name]) for name in ours)
    # ... and those are not the unquantized checkpoint's weights (the layers were quantized).
    unquantized = load_file(write_checkpoint(tmp_path / "bf16", preset="tiny", dtype="float32") / "model-00001-of-00002.safetensors")
    name = "transformer.h.0.mlp.w1.weight"
    assert not torch.equal(plain[name], unquantized[name])


def test_writer_refuses_sizes_the_4_bit_kernels_cannot_take(tmp_path):
    with pytest.raises(ValueError, match=r"attn.c_attn.weight: group size 96 does not divide its 256 inputs"):
        write_checkpoint(tmp_path / "a", preset="tiny", quantization="gptq", group_size=96)
    with pytest.raises(ValueError, match=r"mlp.w1: 1380x256: 4-bit layers need both widths to be multiples of 32"):
        quantize.check_shape("mlp.w1", 1380, 256, 128)


# -- serving ---------------------------------------------------------------------------------

# vLLM's x86 CPU wheel has its 4-bit product in its AVX-512 builds only (on a 2-core AMD Zen 3 with
# AVX2, 2026-12-07, every 4-bit engine died in its worker at the first product): there these
# checkpoints are refused at start, as the refusal tests below check, and nothing here can serve them.
FOUR_BIT_KERNEL = not current_platform.is_cpu() or quantization.has_cpu_gemm_wna16()
needs_4_bit_kernel = pytest.mark.skipif(
    not FOUR_BIT_KERNEL, reason="vLLM's kernels for this CPU (no AVX-512) have no 4-bit product: 4-bit checkpoints "
    "are refused at start here (test_on_this_cpu_every_way_in_refuses_4_bit_checkpoints_at_start)")

@pytest.fixture(scope="module")
def gptq_engine(gptq_checkpoint):
    """The offline engine at its default dtype (the checkpoint says float16), eager for a quick start."""
    llm = LLM(model=str(gptq_checkpoint), enforce_eager=True, seed=0)
    yield llm
    shut_down(llm)


@needs_4_bit_kernel
def test_gptq_is_served_by_vllms_gptq_config_in_16_bits(gptq_engine):
    from vllm.platforms import current_platform

    assert gptq_engine.llm_engine.vllm_config.quant_config.get_name() == "auto_gptq"
    # The checkpoint's float16 where the platform computes in it, else bfloat16.
    expected = torch.float16 if torch.float16 in current_platform.supported_dtypes else torch.bfloat16
    assert gptq_engine.llm_engine.model_config.dtype == expected


@needs_4_bit_kernel
@pytest.mark.parametrize("name", CASE_NAMES)
def test_gptq_matches_the_reference_on_the_dequantized_weights(name, gptq_engine, gptq_reference, parity_cases):
    prompt_ids, images = parity_cases[name]
    assert_close_to_reference(gptq_engine, prompt_ids, images, gptq_reference)


@needs_4_bit_kernel
@pytest.mark.parametrize("name", ["one image", "multi-turn with an image in the history"])
def test_awq_matches_the_reference_on_the_dequantized_weights(name, awq_checkpoint, parity_cases):
    llm = LLM(model=str(awq_checkpoint), enforce_eager=True, seed=0)
    try:
        assert llm.llm_engine.vllm_config.quant_config.get_name() == "auto_awq"
        prompt_ids, images = parity_cases[name]
        assert_close_to_reference(llm, prompt_ids, images, ReferenceQwenVL.from_pretrained(awq_checkpoint))
    finally:
        shut_down(llm)


@pytest.fixture(scope="module")
def real_widths_gptq(tmp_path_factory):
    """The real model's widths (decoder 4096 wide, MLP 11008; two blocks) in the Int4 layout."""
    return write_checkpoint(tmp_path_factory.mktemp("real-widths-gptq"), preset="real-widths", quantization="gptq")


# In the real-widths pass of `scripts/test.sh`. The engine answers first and is shut down before
# the reference (7 GB in float32) loads: both at once did not fit beside each other in 24 GiB.
@pytest.mark.real_widths
@pytest.mark.skipif(os.environ.get("QWEN_VL_REAL_WIDTHS_TESTS") != "1",
                    reason="real widths need the machine's memory: QWEN_VL_REAL_WIDTHS_TESTS=1 runs them")
@needs_4_bit_kernel
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_gptq_at_real_widths_split_across_two_ranks_matches_the_reference(layout, real_widths_gptq, parity_cases):
    """TP=2 splits each rank's share on group boundaries (attn.c_proj: 2048 inputs per rank, 16
    groups; mlp.c_proj: 5504, 43 groups); PP=2 puts a block on each stage. Traced, not compiled:
    pipeline parallelism on the CPU needs vLLM's warm-up run, which eager mode skips."""
    parallel = {"tensor_parallel_size": 2} if layout == "tp2" else {"pipeline_parallel_size": 2}
    names = ("one image", "multi-turn with an image in the history")
    with cpu_threads_bind("0|1"):
        llm = LLM(model=str(real_widths_gptq), max_model_len=2048, seed=0,
                  compilation_config={"mode": 2, "backend": "eager"}, **parallel)
    try:
        served = {name: serve(llm, *parity_cases[name]) for name in names}
    finally:
        shut_down(llm)
    reference = ReferenceQwenVL.from_pretrained(real_widths_gptq)
    try:
        for name in names:
            assert_served_close_to_reference(*parity_cases[name], served[name], reference)
    finally:
        del reference
        gc.collect()


@pytest.fixture(scope="module")
def two_servers(gptq_checkpoint, tmp_path_factory):
    """Our server and `vllm serve` on the GPTQ checkpoint, each at its default dtype: name -> Server."""
    logs = tmp_path_factory.mktemp("int4-servers")
    commands = {
        "ours": [sys.executable, "-m", "qwen_vl.server", "--api-key", API_KEY],
        "vllm serve": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                       "--api-key", API_KEY],
    }
    servers = []
    try:
        for name, command in commands.items():
            servers.append(started(Server(name, lambda port: [
                *command, "--model", str(gptq_checkpoint), "--port", str(port), "--served-model-name", SERVED_MODEL,
                "--enforce-eager", "--seed", "0"], logs / f"{name}.log")))
        yield {server.name: server for server in servers}
    finally:
        for server in servers:
            server.stop()


@needs_4_bit_kernel
def test_our_server_and_vllm_serve_give_the_same_int4_answer(two_servers):
    body = {"model": SERVED_MODEL, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                image_part(data_url(pattern_image(3, (400, 300)))),
                {"type": "text", "text": "What is in this picture?"}]}]}
    answers = chat_answers({name: server.url for name, server in two_servers.items()}, body, timeout=300)
    counts = {name: {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")} for name, answer in answers.items()}
    assert counts["ours"] == counts["vllm serve"] == {"prompt_tokens": counts["ours"]["prompt_tokens"], "completion_tokens": 16}
    ours, theirs = (answers[name]["choices"][0]["message"]["content"] for name in ("ours", "vllm serve"))
    assert ours.strip() == theirs.strip() and ours.strip()


@pytest.mark.skipif(not current_platform.is_zen_cpu(), reason="zentorch's kernel serves 4-bit layers on AMD Zen CPUs only")
def test_on_zen_cpus_gptq_layers_take_zentorchs_fast_path_with_16_bit_activations(two_servers):
    """Both ways in: the GPTQ layers turned to the layout zentorch's fast path takes
    (quantization.gptq_in_zentorch_layout), which then multiplies 16-bit activations
    (`zentorch_woq_linear`), not 8-bit ones (keep_16_bit_activations) nor the generic kernel."""
    for name, server in two_servers.items():
        log = server.log.read_text(errors="replace")
        assert "Using zentorch_woq_linear for W4A16 GPTQ" in log, name
        assert "DA8W4" not in log and "fast path not eligible" not in log, name


# -- refusals --------------------------------------------------------------------------------

def _edited(checkpoint, tmp_path, **fields):
    """A copy of `checkpoint` whose quantization_config has `fields` changed."""
    copy = tmp_path / "edited"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(fields)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("fields, says", [
    ({"group_size": 256}, r"GPTQ checkpoint with bits=4, group_size=256 cannot run on cpu: .*group_size"),
    ({"bits": 8}, r"GPTQ checkpoint with bits=8, group_size=128 cannot run on cpu"),
    ({"desc_act": True}, r"desc_act=True\) is no longer supported"),
    ({"sym": False}, r"Unsupported quantization config: bits=4, sym=False"),
], ids=["group 256", "8 bits", "desc_act", "asymmetric"])
def test_a_gptq_layout_that_cannot_run_is_refused_before_any_worker_starts(fields, says, gptq_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=says):
        EngineArgs(model=str(_edited(gptq_checkpoint, tmp_path, **fields))).create_engine_config()


def test_a_tensor_parallel_size_that_splits_a_group_is_refused_naming_the_layer(gptq_checkpoint):
    # The tiny attention's 256 outputs at TP=4: c_proj takes 64 inputs per rank, half a group of 128.
    with pytest.raises(ValueError, match=r"attn.c_proj: 64 inputs per rank \(tensor parallel size 4\) do not split into groups of 128"):
        EngineArgs(model=str(gptq_checkpoint), tensor_parallel_size=4).create_engine_config()


def test_float16_is_refused_where_the_cpu_cannot_compute_in_it(gptq_checkpoint, monkeypatch):
    from vllm.platforms import current_platform

    # As ZenCpuPlatform on an AMD CPU without AVX512-FP16 reports it (on such a machine, as it is).
    monkeypatch.setattr(type(current_platform), "supported_dtypes", property(lambda self: [torch.bfloat16, torch.float32]))
    name = type(current_platform).__name__
    with pytest.raises(ValueError, match=rf"dtype float16 does not run on {name} .*use --dtype auto or one of bfloat16, float32"):
        EngineArgs(model=str(gptq_checkpoint), dtype="float16").create_engine_config()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_cpu_whose_vllm_kernels_lack_the_4_bit_product_refuses_4_bit_checkpoints(
        method, gptq_checkpoint, awq_checkpoint, monkeypatch):
    # As vLLM's AVX2 build reports it on an x86 CPU without AVX-512 (on such a machine, as it is).
    monkeypatch.setattr(quantization, "has_cpu_gemm_wna16", lambda: False)
    checkpoint = gptq_checkpoint if method == "gptq" else awq_checkpoint
    with pytest.raises(ValueError, match=rf"{method.upper()} checkpoint cannot run on this CPU: vLLM's kernels built "
                       r"for it lack the 4-bit product its layers call \(torch.ops._C.cpu_gemm_wna16"):
        EngineArgs(model=str(checkpoint)).create_engine_config()


@pytest.mark.skipif(FOUR_BIT_KERNEL, reason="this CPU's vLLM kernels have the 4-bit product")
def test_on_this_cpu_every_way_in_refuses_4_bit_checkpoints_at_start(gptq_checkpoint):
    import subprocess

    says = "GPTQ checkpoint cannot run on this CPU: vLLM's kernels built for it lack the 4-bit product"
    with pytest.raises(ValueError, match=says):
        LLM(model=str(gptq_checkpoint), enforce_eager=True)
    for name, command in (("ours", [sys.executable, "-m", "qwen_vl.server"]),
                          ("vllm serve", [sys.executable, "-m", "vllm.entrypoints.openai.api_server"])):
        done = subprocess.run([*command, "--model", str(gptq_checkpoint), "--port", str(free_port())],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and says in done.stderr, (name, done.stderr[-2000:])
        assert "WorkerProc" not in done.stdout + done.stderr, name
        if name == "ours":
            assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(f"qwen-vl-serve: error: {says}")
            assert "Traceback" not in done.stderr


def test_float32_is_refused_for_4_bit_layers(gptq_checkpoint):
    with pytest.raises(ValueError, match=r"torch.float32 is not supported for quantization method auto_gptq"):
        EngineArgs(model=str(gptq_checkpoint), dtype="float32").create_engine_config()


@needs_4_bit_kernel
def test_tensors_the_4_bit_layers_do_not_take_are_checked_not_ignored(gptq_engine):
    quant_config = gptq_engine.llm_engine.vllm_config.quant_config
    assert checked_extra("h.0.mlp.w1.g_idx", torch.arange(256, dtype=torch.int32) // 128, quant_config, has_bias=False)
    assert checked_extra("h.0.mlp.w1.bias", torch.zeros(256, dtype=torch.float16), quant_config, has_bias=False)
    assert not checked_extra("h.0.mlp.w1.other", torch.zeros(1), quant_config, has_bias=False)
    with pytest.raises(ValueError, match=r"h.0.mlp.w1.g_idx: activation-ordered groups"):
        checked_extra("h.0.mlp.w1.g_idx", torch.arange(256, dtype=torch.int32).flip(0) // 128, quant_config, has_bias=False)
    with pytest.raises(ValueError, match=r"h.0.mlp.w1.bias: a nonzero bias"):
        checked_extra("h.0.mlp.w1.bias", torch.ones(256, dtype=torch.float16), quant_config, has_bias=False)
    check_zero_points("q.qzeros", torch.full((2, 4), 0x77777777, dtype=torch.int32))  # AutoGPTQ (v1)
    check_zero_points("q.qzeros", torch.full((2, 4), -0x77777778, dtype=torch.int32))  # 0x88888888, GPTQModel (v2)
    with pytest.raises(ValueError, match=r"q.qzeros: zero points \[3, 7\]"):
        check_zero_points("q.qzeros", torch.tensor([[0x77777777, 0x77737777]], dtype=torch.int32))


def test_our_server_refuses_a_layout_that_cannot_run_in_one_line(gptq_checkpoint, tmp_path):
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "qwen_vl.server", "--model", str(_edited(gptq_checkpoint, tmp_path, group_size=256)),
         "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen-vl-serve: error: GPTQ checkpoint with bits=4, group_size=256 cannot run on cpu")
    assert "Traceback" not in done.stderr
