"""``ue protect``: a data owner's folder of images to protected lossless PNGs, with a report (see command.py)."""

from ue_lightning.protect.command import protect_folder

__all__ = ["protect_folder"]
