"""Noise schedules and samplers: VideoCrafter2/FIFO DDIM (``ddim``) and CogVideoX (``cogvideox``)."""
