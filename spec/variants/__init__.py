"""One spec per variant; each registers itself."""
