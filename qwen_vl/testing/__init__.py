"""What tests, benchmarks and the demo build Qwen-VL checkpoints and answers from: the
independent plain-PyTorch reference of the original code (reference.py, the parity tests' and the
benchmarks' baseline), and the writer of checkpoints in the exact Qwen-VL-Chat layouts, random or
round-to-nearest 4-bit (checkpoint.py, quantize.py). Nothing in the serving path imports this
package except to write the built-in demo checkpoint when no model is given."""
