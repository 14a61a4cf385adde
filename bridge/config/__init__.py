"""From YAML to frozen, validated configuration objects."""
