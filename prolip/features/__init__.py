"""Images to pre-projection features: loading user images, training and test views, extraction, the cache."""
