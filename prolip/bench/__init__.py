"""``prolip bench``: the paper's evaluation protocol over datasets, shots, seeds and methods."""
