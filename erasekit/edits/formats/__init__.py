"""File formats other tools read: kohya LoRA files, original-layout checkpoints."""
