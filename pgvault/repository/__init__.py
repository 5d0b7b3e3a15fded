"""The logical store: keys, packs, index, stanzas, manifests and WAL on any backend."""
