"""Protégé SDK: submit and watch hybrid RL + imitation jobs, and serve rewards. Never imports
torch."""

__version__ = "0.1.0"
