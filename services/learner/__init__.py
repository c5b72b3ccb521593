"""Learner service: owns jobs, runs the hybrid objective, checkpoints."""
