"""Engine directory → images: backends behind one Engine interface, and the txt2img loop."""
