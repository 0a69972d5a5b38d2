"""bootkey: unlock LUKS volumes at boot with keys sealed in Vault, held only in locked memory."""

__version__ = "0.1.0"
