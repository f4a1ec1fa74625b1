"""GRPO: the step as one unit (step.py) and the thin training loop around it (rl/grpo/train.py)."""
