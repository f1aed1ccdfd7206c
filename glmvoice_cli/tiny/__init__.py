"""Writers of tiny random checkpoints in the official on-disk formats, for tests and `glmvoice selftest`."""
