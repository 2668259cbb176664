"""mllmeraser: make a multimodal LLM forget chosen knowledge at test time, by input-aware activation steering
(MLLMEraser, arXiv 2510.04217). No parameter is updated; detaching the eraser restores the model exactly."""

__version__ = "0.1.0"
