"""lmlab's version: what the package says it is and what every file it writes records (`lmlab_version`). A module
of its own, low in the tree, so that the modules writing it need not import the package's top, which names the
Python API above them."""

__version__ = "0.1.0"
