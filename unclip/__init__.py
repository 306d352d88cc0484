"""unclip: a tested reproduction of unCLIP (Ramesh et al. 2022, arXiv 2204.06125)."""

__version__ = "0.1.0"
