"""What tests, benchmarks and the demo build Qwen-VL checkpoints and answers from: the
independent plain-PyTorch reference of the original code (reference.py, the parity tests' and the
benchmarks' baseline), and the writer of checkpoints in the exact Qwen-VL-Chat layouts, random or
round-to-nearest 4-bit (checkpoint.py, quantize.py); and the built-in demo, trained weights shipped
as one file and expanded into a checkpoint (demo_checkpoint.py). Nothing in the serving path imports
this package except to expand the demo when no model is given."""
