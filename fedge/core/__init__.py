"""The loop in plain Python: poll -> trigger -> campaign -> gate -> promote.

It talks to the devices, the registry, the tracker and its saved state through
small ports, and imports neither Flower, MLflow nor torch.
"""
