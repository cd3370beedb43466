"""atelier's GPU side: model loading, job execution, encoding, upload."""
