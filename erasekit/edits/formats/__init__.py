"""File formats other tools read, written from erasekit edits: :mod:`.kohya`, the single-file
LoRA of kohya's sd-scripts that Automatic1111, ComfyUI and diffusers load (and LoRAs fitted to
weight deltas by truncated SVD, so that ESD / UCE edits can travel as such a file)."""
