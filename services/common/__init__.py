"""Torch-bound code shared by the services: tensor codec, model loading, tiny models."""
