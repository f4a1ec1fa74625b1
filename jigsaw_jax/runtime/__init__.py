"""Run-time plumbing shared by every task: checkpoints, restore, the saved run config."""
