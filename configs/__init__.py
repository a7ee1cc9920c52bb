"""YAML presets for `mpl-fast train` (installed as the package data mpl_fast.configs)."""
