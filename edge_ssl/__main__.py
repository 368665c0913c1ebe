"""`python -m edge_ssl` (and `torchrun ... -m edge_ssl pretrain`) runs the CLI."""

from edge_ssl.cli import main

main()
