"""Evaluation: label propagation (pure core, presets, feature sources, the DAVIS runner) and the DAVIS J&F metric.

Main entry points: :func:`vidssl.evaluation.propagation.label_propagation` (one target frame),
:func:`vidssl.evaluation.propagation.propagate_video`, :func:`vidssl.evaluation.runner.propagate_davis` (the DAVIS
loop) and :func:`vidssl.evaluation.evaluate.evaluate_results` (official J&F).
"""
