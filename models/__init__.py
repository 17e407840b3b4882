"""Keras models: a configurable CNN, MNIST, and (coming) patch classifiers."""
