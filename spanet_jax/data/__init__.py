"""Input: TFDS and class-folder sources read by index (pipeline), training transforms and
RandAugment, mixing and erasing on device (augment), evaluation preprocessing and image
decoding (preprocess), ImageNet class names (labels)."""
