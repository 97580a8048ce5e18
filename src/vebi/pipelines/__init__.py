"""The jobs behind the command-line scripts; each takes a composed Hydra config."""
