"""The demo model: a small Qwen-VL-Chat trained on this machine's CPU on drawn scenes.

    scenes.py   the scenes and their two generators (training, evaluation)
    tasks.py    the questions, their answers in Qwen-VL-Chat's format, and their scoring
    network.py  Qwen-VL as a trainable PyTorch module, the same function the plugin serves
    train.py    the training run: python -m qwen_vl.demo.train OUT
    weights.py  the training's weights file -> a checkpoint in the original layout

Status and figures: docs/demo.md.
"""
