"""Retrieval at serving time: a gallery ranked by ITC then re-ranked by ITM (`gallery.py`), and
an exact top-k index over memory-mapped embeddings for large galleries (`index.py`)."""
