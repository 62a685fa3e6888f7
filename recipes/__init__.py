"""Training recipes: model definitions, data and the example trainer for lightning-mics."""
