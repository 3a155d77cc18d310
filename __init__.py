"""diffaccel: drop-in accelerations for diffusers pipelines, each measured for speed and quality."""

__version__ = "0.1.0"
