"""Storage backends: move bytes under string keys. See base.Backend for the contract."""
