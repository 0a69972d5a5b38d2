"""bootkey: unlock LUKS volumes at boot with keys sealed in Vault, held only in locked memory."""

from bootkey_core import __version__

__all__ = ["__version__"]
