"""GroundingDINO through transformers: the objects protocol's detector (Receler).

The class name is the caption; box and text thresholds 0.5 (the protocol's); "detected" means
at least one box survives both thresholds.
"""

from __future__ import annotations

import torch

from .detectors import Detection, load_pretrained, resolve_weights

DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"  # SwinT-OGC, the paper's


class GroundingDinoDetector:
    """Open-vocabulary detection with GroundingDINO: is there a box for the concept's name?"""

    name = "grounding-dino"

    def __init__(self, model, processor, source: str, box_threshold: float = 0.5, text_threshold: float = 0.5):
        self.model = model.eval()
        self.processor = processor
        self.source = source
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.threshold = self.box_threshold

    @classmethod
    def load(
        cls, model: str | None = None, box_threshold: float = 0.5, text_threshold: float = 0.5, device="cpu"
    ) -> GroundingDinoDetector:
        """From a folder (``save_pretrained`` of the model and its processor) or a hub id."""
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        source = resolve_weights(model, DEFAULT_GROUNDING_DINO, "GroundingDINO")
        net = load_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, source, "GroundingDINO")
        processor = load_pretrained(AutoProcessor.from_pretrained, source, "GroundingDINO's processor")
        return cls(net.to(device), processor, source, box_threshold, text_threshold)

    def record(self) -> dict:
        return {"model": self.source, "box_threshold": self.box_threshold, "text_threshold": self.text_threshold}

    @torch.no_grad()
    def detect(self, images: torch.Tensor, concept: str) -> Detection:
        """Score (B,): the best surviving box's score (0 when none); detected: any box."""
        caption = concept.strip().lower().rstrip(".") + " ."
        arrays = [
            (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for img in images
        ]
        inputs = self.processor(images=arrays, text=[caption] * len(arrays), return_tensors="pt").to(
            next(self.model.parameters()).device
        )
        outputs = self.model(**inputs)
        sizes = [tuple(img.shape[-2:]) for img in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=sizes,
        )
        scores = torch.tensor([float(r["scores"].max()) if len(r["scores"]) else 0.0 for r in results])
        detected = torch.tensor([len(r["scores"]) > 0 for r in results])
        details = [{"boxes": len(r["scores"])} for r in results]
        return Detection(
            scores=scores,
            detected=detected,
            concept=concept,
            detector=self.name,
            threshold=self.box_threshold,
            details=details,
        )


def grounding_dino_detector(model=None, threshold=None, **options):
    """GroundingDINO boxes (box threshold 0.5 by default)."""
    return GroundingDinoDetector.load(model, box_threshold=0.5 if threshold is None else float(threshold), **options)
