"""Protégé services (generator, reward, reference, learner). Needs the `server` extra."""
