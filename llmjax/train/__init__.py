"""Training: state, optimizers, the jitted step, the loop, checkpoints and metrics (see DESIGN.md)."""
