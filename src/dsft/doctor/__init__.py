"""`dsft doctor MODEL_DIR`: checks a model folder's chat template across training and every serving path."""
