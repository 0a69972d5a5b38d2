"""One module per `bootkey` subcommand group: argument parsing and output only.

Each module exposes `register(subparsers)`, which adds its parsers and sets `run` on each
to a function `(args) -> int`. Decisions live in the library modules they call.
"""
