"""Evaluation: suites of prompts, detectors, metrics, the generation runner, attacks, reports.

Architecture. :func:`evaluate.evaluate` and :func:`attacks.attack` take a suite and a detector
by name and look them up in the registries of :mod:`erasekit.registry`:

- ``SUITES`` (:func:`suites.make_suite`): the core registers ``objects``, ``i2p-nudity`` and
  ``coco`` (:mod:`.suites`); every suite yields :class:`suites.Case` objects and scores images;
  object suites compute Acc_E / Acc_R / Acc_L / H with :func:`metrics.object_accuracies`;
- ``DETECTORS`` (:func:`detectors.make_detector`): the core registers ``nudenet``, ``clip``,
  ``q16`` and ``grounding-dino`` (:mod:`.detectors`).

Plug-ins register more: the toy world (:mod:`erasekit.toyworld`) adds suites ``toy-objects``,
``toy-styles`` and ``toy-colors`` and detector ``toy``. Nothing in this package imports the toy world.
"""
