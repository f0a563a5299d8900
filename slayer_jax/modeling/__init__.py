"""The model: its config, the one decoder over a plain list of layers, attention backends, the loss."""
