"""sidestep's external processor: Envoy asks it, once per attempt, where the attempt goes."""
