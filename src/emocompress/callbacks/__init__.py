"""Lightning callbacks: each does one thing to ``pl_module.model`` or to a run's outputs."""
