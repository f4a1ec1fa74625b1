"""Proxy-RLHF: the proxy network (network.py), its accept/reject decode hook (sampler.py), its loss
(loss.py), the step unit (step.py) and the `proxy` task's loop (train.py)."""
