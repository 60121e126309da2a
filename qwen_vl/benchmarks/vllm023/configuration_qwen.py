"""Qwen-VL's configuration as the remote code vLLM 0.23 loads (`auto_map` of config.json:
`configuration_qwen.QWenConfig`, with `--trust-remote-code`). Every key of config.json becomes
an attribute as it is (`visual` stays a dict, as vLLM 0.23's model reads it); vLLM 0.23 itself
maps `rotary_emb_base` and `rotary_pct` to its rotary parameters."""

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
