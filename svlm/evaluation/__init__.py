"""Scoring a model: `evaluate.py` (eval.py: validation loss and perplexity,
exact-match answer accuracy by language and question type) and `samples.py`
(the sample grid a training run draws at every validation)."""
