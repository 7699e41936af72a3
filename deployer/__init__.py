"""deployer: continuous deployment for fleets of plain Docker hosts."""

__version__ = "0.1.0"
