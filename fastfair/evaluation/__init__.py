"""The parts of ``python -m fastfair.evaluate``: model sources, the image cache, scoring, the report."""
