"""unik: compile applications into micro-VM images and run them with QEMU."""

__version__ = "0.1.0"
