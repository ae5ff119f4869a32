"""The FP8 accuracy lab: perplexity, KL, top-1 agreement, per-layer sensitivity, calibration.
Imports engine.llm, core/, model/, sampling/ and kernels/; used by serving/ (the eval and quantize
commands) and bench/."""
