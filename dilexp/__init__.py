"""dilexp: config-driven experiments for long-context attention research."""

__version__ = "0.1.0"
