"""Answering with a finished model: `generation.py` (greedy or sampled decoding
with the KV cache) and `ask.py` (infer.py: one picture, one question, the answer
streamed). The server (`svlm/serve/`) decodes with the same generation code."""
