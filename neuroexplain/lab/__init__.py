"""Research tooling: synthetic data, training and the evaluations. Serving code never imports this package."""
