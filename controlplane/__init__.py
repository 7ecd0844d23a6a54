"""sidestep's control plane: config, Envoy rendering, process supervision and the CLI."""
