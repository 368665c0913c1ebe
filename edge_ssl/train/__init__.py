"""SSL pretraining: the loop, the methods, optimizers and process groups."""
