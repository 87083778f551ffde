"""Evaluation: perplexity (ppl.py, reference WikiText-2 protocol) and lm-eval tasks (harness.py, the facade over
tasks.py, local_data.py and lm_eval_run.py), with the built-in offline suite (wiki_suite.py)."""
