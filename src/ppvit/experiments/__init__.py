"""The paper's comparison: presets as data, their reproduction, result tables, previews."""
