"""Evaluation on fixed held-out puzzle sets (evaluate.py: the Evaluator, its reports, task=eval)."""
