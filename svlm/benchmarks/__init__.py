"""Standard VLM benchmarks scored as lmms-eval scores them: `python eval.py
benchmark=<task> benchmark.path=<git clone of its data set>`.

    tasks.py   the tasks (MMStar, POPE, MME, ScienceQA-IMG, AI2D): prompts, scores, metrics
    task.py    what a task is; reading its questions from the local copy
    answers.py reading an answer out of a reply, as lmms-eval does
    run.py     answering every question (sharded over processes), results.json, predictions.jsonl
"""
