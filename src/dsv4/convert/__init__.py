"""State-dict adapters beside the model: transformers' DeepseekV4 layout <-> dsv4 (official names)."""
