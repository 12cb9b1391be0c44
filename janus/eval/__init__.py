"""Evaluations on the shapes world (docs/shapes.md): a programmatic detector, and GenEval / VQA /
POPE-style metrics with perplexity, run by `janus eval shapes`."""

from .detector import DetectedObject, detect
from .shapes_eval import evaluate, format_report

__all__ = ["DetectedObject", "detect", "evaluate", "format_report"]
