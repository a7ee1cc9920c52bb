"""Networks (WRN, ResNet, a timm adapter, small nets) and activation checkpointing."""
