"""Benchmarks: the sdexport runtime against eager diffusers, measured the same way in one process."""
