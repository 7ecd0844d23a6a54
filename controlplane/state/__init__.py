"""Shared state: the replicated table (`table`), its wire form (`codec`, `v1`), the control plane's
service (`service`) and the workers' replica client (`replica`)."""
