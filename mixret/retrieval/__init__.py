"""Retrieval: the vector index, BM25 and TF-IDF, fusion, the matcher tournament, the embeddings folder and its
updates, search and evaluation. Import its modules by their path (mixret.retrieval.search, ...)."""
