"""ue_lightning: unlearnable examples (EM, REM, data collapse, TUE) and their victims, on Lightning."""

__version__ = "0.1.0"
