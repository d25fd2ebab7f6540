"""What prolip derives from a CLIP model: the backbone, its tower families, preprocessing, T and fingerprints."""
