"""prefopt: preference optimization for language models on one trainer core.

Losses: ``prefopt.losses``; recipes and config: ``prefopt.config``; training: ``prefopt.trainer``.
"""

__version__ = "0.1.0"
