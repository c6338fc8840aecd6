"""File formats other tools read, written from erasekit edits:

- :mod:`.kohya`: the single-file LoRA of kohya's sd-scripts that Automatic1111, ComfyUI and
  diffusers load, and LoRAs fitted to weight deltas by truncated SVD (so ESD / UCE edits can
  travel as such a file);
- :mod:`.single_file`: an SD 1.x pipeline as one original-layout checkpoint (Automatic1111).
"""
