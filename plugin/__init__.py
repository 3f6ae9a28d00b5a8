"""The serving edge: image decoding, classifiers, the pipeline file and the defended pipeline."""
