"""TorchServe side of neuroexplain: the custom handler, its wire contract, and what builds model archives (.mar)."""
