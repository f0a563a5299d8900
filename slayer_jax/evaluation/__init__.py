"""Evaluation: the one continuation scorer, task sets, the packed sweep scorer, lm-eval, the code sandbox."""
