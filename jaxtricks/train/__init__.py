"""Train state, losses, the jit train step, the loop and optimizers."""
