"""On-device adaptation: plan, step, BN statistics, LoRA, replay, guard, tune, run."""
