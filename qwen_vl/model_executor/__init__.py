"""Qwen-VL / Qwen-VL-Chat as a vLLM out-of-tree model plugin.

vLLM calls `register` (entry point group `vllm.general_plugins`) in every
process it starts; each step is idempotent.

Where the package meets vLLM 0.32
---------------------------------
Every place the package overrides, patches or relies on vLLM's internals, why no public
extension point serves (or which one is used), and the tests that fail if vLLM's behaviour
under it changes (in tests/). A new hook anywhere in the package gets its entry here.

Public extension points:
- The model: `ModelRegistry.register_model` (below); the model interfaces (SupportsMultiModal,
  SupportsMRoPE, SupportsPP) and vLLM's model helpers, `_merge_multimodal_embeddings` among them
  as vLLM's own models use it (model.py); the processor registered with MULTIMODAL_REGISTRY,
  implementing the methods vLLM's own models implement (processor.py). Tests: test_parity.py.
- Config and tokenizer: transformers' `AutoConfig.register` and `AutoTokenizer.register`
  (config.py, tokenizer.py), which vLLM's loaders consult before remote code. Tests:
  test_config.py::test_real_config_loads_through_vllm,
  test_tokenizer.py::test_loads_through_vllm_get_tokenizer.
- `vllm serve`'s chat template: `register_chat_template_fallback_path` (below). Test:
  test_vllm_serve.py::test_vllm_serve_renders_the_original_prompt_with_our_chat_template.
- The renderer: tokenizer mode "qwen_vl" (vLLM's Hugging Face tokenizer, our renderer), added with
  the tokenizer and renderer registries' `register` (renderer.py) and set for Qwen-VL by the
  per-architecture hook, as vLLM sets its own Kimi K3's and Inkling's. Tests: test_vllm_hooks.py.
- The platform: entry point group `vllm.platform_plugins` (cpu_platform.py); to answer only where
  vLLM would pick its Zen platform it asks vLLM's private `platforms._is_amd_zen_cpu`. Tests:
  test_cpu_platform.py::test_default_platform_is_zen_on_amd_with_avx512_and_vllms_cpu_platform_elsewhere,
  ::test_opt_out_keeps_vllms_cpu_platform.
- Metrics: AsyncLLM's `stat_loggers` (engine/metrics.py). Test:
  test_server_metrics.py::test_engine_gauges_show_a_running_request_and_its_kv_cache.

vLLM's internals (no public extension point does it):
- The per-architecture config hook: our entry in `MODELS_CONFIG_MAP` (serving.py), where vLLM's
  own models adjust their settings; out-of-tree models have no other. It points vLLM at a copy of
  the generation config with the chat's stops, sets the tokenizer mode, keeps images' modes, and
  refuses a dtype, parallel sizes or a 4-bit layout the workers could not run (quantization.py
  asks vLLM's kernel choosers, `choose_mp_linear_kernel` and `verify_marlin_supported`, what they
  would answer). Tests: test_vllm_serve.py::test_vllm_serve_stops_at_the_chat_turns_end,
  ::test_vllm_serve_and_our_server_give_the_same_greedy_answer (its RGBA image),
  test_checkpoint_facts.py, test_quantized.py::test_float16_is_refused_where_the_cpu_cannot_compute_in_it,
  ::test_a_gptq_layout_that_cannot_run_is_refused_before_any_worker_starts,
  ::test_a_cpu_whose_vllm_kernels_lack_the_4_bit_product_refuses_4_bit_checkpoints,
  test_tensor_parallel.py::test_vit_mlp_width_that_does_not_divide_is_refused_naming_it,
  test_pipeline_parallel.py::test_eager_pipeline_parallelism_is_refused_offline_before_any_worker_starts.
- The renderer's `_process_singleton(_async)` (renderer.py): the one place every prompt passes
  after its images are expanded and before the prefix cache hashes it, where the dynamic-NTK
  cache salt is set. Tests: test_vllm_hooks.py,
  test_long_context.py::test_a_cached_prefix_is_not_reused_under_another_alpha.
- The data parser's `_parse_image_data`, the processor's `apply` and `_postprocess_prompt`
  (processor.py): images as stored (vLLM turns photos by EXIF and has no option against it), a
  clear error for a span/image count mismatch, whatever a span holds dropped. Tests:
  test_processor.py::test_images_from_vllms_loader_reach_the_model_as_stored,
  ::test_mismatched_image_count_is_a_clear_error, ::test_path_inside_the_span_does_not_change_the_answer.
- Dynamic NTK: `RotaryEmbedding._compute_cos_sin_cache` overridden for a table per alpha
  (rotary.py), and `QWenConfig.mrope_section` so that vLLM asks the model for each request's
  positions (M-RoPE's route; vLLM has no per-request rotary). Tests: test_long_context.py.
- Top-p on CPUs: vLLM's `topk_topp_sampler.apply_top_k_top_p` replaced where Triton is absent
  (sampling.py); logits processors run before vLLM's top-p and cannot spare its sort. Test:
  test_sampling.py::test_vllms_cpu_sampler_uses_it_once_installed.
- Fast exit: in vLLM's engine processes, found by their names, `os._exit` at multiprocessing's
  exit report (exit.py); vLLM has no option to skip the interpreter's teardown. Tests:
  test_lifecycle.py::test_idle_server_stops_cleanly_on_sigterm, test_fast_exit.py.
- The scheduler (qwen_vl/engine/scheduler.py): given by the public --scheduler-cls, but it
  subclasses vLLM's v1 `Scheduler` and `AsyncScheduler`, reads their request queues and rewrites
  `long_prefill_token_threshold` before each step (vLLM reads it afresh). Tests:
  test_scheduler.py::test_a_long_prompt_beside_decoding_streams_is_prefilled_in_small_steps,
  ::test_the_engine_configuration_selects_the_scheduler_and_carries_the_budget.
- The engine's configuration (qwen_vl/engine/engine.py): `max_num_encoder_input_tokens` set
  after vLLM built it (--images-per-step; vLLM has no argument for it), and the headless nodes
  run vLLM's `MultiprocExecutor` on it (vLLM's `serve --headless` builds its own). Tests:
  test_images_per_step.py::test_the_engine_configuration_carries_the_image_budget,
  test_multi_node.py::test_tensor_parallel_across_two_nodes_matches_reference.
- 4-bit tensors vLLM's layers drop silently (`g_idx`, `qzeros`, zero biases) are checked by
  `load_weights` (quantization.py). Test:
  test_quantized.py::test_tensors_the_4_bit_layers_do_not_take_are_checked_not_ignored.
- 4-bit layers on AMD Zen CPUs (quantization.py): `load_weights` turns GPTQ layers that vLLM gave
  zentorch's kernel (`ZentorchWNA16LinearKernel`) to the layout its fast path checks for
  (`gptq_in_zentorch_layout`: the same words, transposed, with the attributes the kernel reads),
  and the per-architecture hook sets vLLM's VLLM_CPU_INT4_W4A8 to 0 unless the user set it
  (`keep_16_bit_activations`), so that layers multiply 16-bit activations as the original does.
  Test: test_quantized.py::test_on_zen_cpus_gptq_layers_take_zentorchs_fast_path_with_16_bit_activations
  and the GPTQ parity tests there.
- bfloat16 products on CPUs without them (cpu_products.py): the model's post-load hook (public)
  replaces the `cpu_linear` that vLLM's `dispatch_cpu_unquantized_gemm` set on a layer it left to
  torch's F.linear, and vLLM's unquantized method calls it; vLLM offers no other way to choose a
  CPU layer's product. Tests: test_cpu_products.py::test_vllm_linear_layers_call_the_product_we_give_them,
  ::test_on_this_cpu_vllm_leaves_bfloat16_layers_to_torchs_linear_and_we_widen_them.
- Beside vLLM, not in it: qwen_vl/_torch_extras.py makes torchvision, torchaudio and torchcodec
  builds that cannot load look absent to transformers, which vLLM imports. Test:
  test_torch_extras.py::test_importing_qwen_vl_first_hides_them.
"""

from pathlib import Path

ARCHITECTURE = "QWenLMHeadModel"
MODEL_TYPE = "qwen"
# The original chat() prompt as a Jinja template, for vLLM's own OpenAI server
# (`vllm serve`). Both servers build the ids of the original's conversations with
# chat_prompt.py (renderer.py for `vllm serve`); the template renders the rest.
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def register() -> None:
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    from .config import register_config
    from .exit import install_fast_exit
    from .renderer import register_renderer
    from .sampling import install_cpu_top_p
    from .serving import register_serving_defaults
    from .tokenizer import register_tokenizer

    install_fast_exit()
    install_cpu_top_p()
    register_config()
    register_tokenizer()
    register_renderer()
    register_serving_defaults(ARCHITECTURE)
    if get_chat_template_fallback_path(MODEL_TYPE, "") != CHAT_TEMPLATE:
        register_chat_template_fallback_path(MODEL_TYPE, CHAT_TEMPLATE)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:class" form: the model module imports torch layers that
        # must not initialise a device in the process that registers.
        ModelRegistry.register_model(ARCHITECTURE, "qwen_vl.model_executor.model:QWenLMHeadModel")
