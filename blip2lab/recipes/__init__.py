"""Recipes: whole training runs built from the package (the shapes world; later mini-real)."""
