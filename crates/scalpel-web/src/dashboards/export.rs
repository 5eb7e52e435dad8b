//! Exports: Neuronpedia-compatible JSON and a static HTML page per latent.
