"""CLI commands of each capability; each module registers on ``edge_ssl.commands.common.app``."""
