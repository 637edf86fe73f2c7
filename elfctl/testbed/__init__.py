"""The offline test bed: a synthetic language, tasks and tiny local assets."""
