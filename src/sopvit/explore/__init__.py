"""A trained backbone's answers about a user's own images: embeddings, search, near-duplicates, prototypes."""
