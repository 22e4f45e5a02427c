"""Training a drafter: the loop (accelerate), the TiDAR objective, data, self-distillation, offline prompt sets."""
