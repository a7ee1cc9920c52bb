"""mpl-fast: a fast, faithful Meta Pseudo Labels trainer and fused semi-supervised loss ops."""
__version__ = "0.1.0"
