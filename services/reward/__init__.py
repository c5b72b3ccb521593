"""Reward service: built-in scorers served through the reward kit."""
