"""The Gaussian trainer, one concept per module.

``config`` (hyperparameters, recorded in report.json), ``clock`` (wall time, budget, stages,
progress and cancel), ``schedule`` (resolution levels and learning-rate schedules),
``outer_volume`` (attenuation outside the Gaussians' support), ``initialisation`` (random and SART
starts), ``checkpoint`` (safe, exact save and resume) and ``trainer`` (the loop).
"""
