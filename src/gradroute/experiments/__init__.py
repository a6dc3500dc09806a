"""Experiments built on gradroute's public API (the core never imports this package).

- :mod:`~gradroute.experiments.toyworld`: the toy persona world's tasks, personas, graders and evaluation.
- :mod:`~gradroute.experiments.config`: :class:`DemoConfig`, the toy world's pre-training, RL and evaluation settings.
- :mod:`~gradroute.experiments.grpo`: the one GRPO runner (:func:`pretrain`, :func:`grpo_run`), shared by the
  demo, the claims harness and the recipes.
- :mod:`~gradroute.experiments.progress`: progress lines and the libraries' noise off.
- :mod:`~gradroute.experiments.workers`: one torch thread, and pools of one-thread worker processes.
- :mod:`~gradroute.experiments.demo`: ``gradroute demo``.
- :mod:`~gradroute.experiments.world`: what the claims harness needs from a model and its environments
  (:class:`World`), the toy world as one (:class:`ToyWorld`), and :func:`load_world`.
- :mod:`~gradroute.experiments.arms`: the claims harness's arms, one small class each.
- :mod:`~gradroute.experiments.claims`: ``gradroute claims``: running the arms, measures, targets, summary, figure.
"""
