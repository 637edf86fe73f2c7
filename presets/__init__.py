"""Preset YAML files, shipped inside the package as elfctl.presets."""
