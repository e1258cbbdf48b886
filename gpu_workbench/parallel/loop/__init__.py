"""The training loop, the run directory and the run summary (docs/ARCHITECTURE.md, "The loop")."""
