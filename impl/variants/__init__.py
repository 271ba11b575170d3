"""One file per variant; each registers itself with `impl.registry.register`."""
