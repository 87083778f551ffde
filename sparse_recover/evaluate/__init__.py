"""Evaluation: perplexity (reference WikiText-2 protocol); lm-eval tasks come later."""
