"""A MinIO KES-compatible key service, usable on its own or embedded in `bootkey agent`."""
