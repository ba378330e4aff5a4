"""Evaluation: label propagation (pure core, presets, feature sources, the DAVIS runner) and the DAVIS J&F metric.

Main entry points: :func:`vidssl.evaluation.propagation.label_propagation` (one target frame),
:func:`vidssl.evaluation.propagation.propagate_video`, :func:`vidssl.evaluation.runner.propagate_davis` (the DAVIS
loop) and :func:`vidssl.evaluation.evaluate.evaluate_results` (official J&F).

Frozen-feature probes (``vidssl probe``): :func:`vidssl.evaluation.probe.run_probe` (a checkpoint or built-in encoder
beside its random init, one JSON report) and the pure tensor protocols :func:`~vidssl.evaluation.probe.linear_probe`,
:func:`~vidssl.evaluation.probe.knn_classify`, :func:`~vidssl.evaluation.probe.retrieval_recall` and
:func:`~vidssl.evaluation.probe.arrow_of_time_probe`; :class:`~vidssl.evaluation.probe.ProbeMonitor` runs them on the
live encoder during training (``train(monitors=...)``, or the recipe's ``monitor.probe`` section).
"""
