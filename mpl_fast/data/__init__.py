"""Data: embedded data sets, label splits, input pipelines."""
