"""A task module without a model factory."""

INPUT_SHAPE = (64,)
