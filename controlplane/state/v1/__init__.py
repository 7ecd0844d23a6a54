"""Stubs generated at build time from protos/controlplane/state/v1/state.proto (not checked in)."""
