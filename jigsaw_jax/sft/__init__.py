"""Supervised training: the SFT task (train.py), its step (steps.py) and the pretraining stage that
gives the CPU miniature its answer format (pretrain.py)."""
