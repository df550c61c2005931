"""One module per ``recvae`` subcommand, each with ``register(subparsers)``."""
