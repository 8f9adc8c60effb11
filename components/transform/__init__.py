"""The torch-side stages before export: distillation, structural pruning, and the training loop they share."""
