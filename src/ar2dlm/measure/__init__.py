"""Speed: bench, tune, plan, plots and the demo."""
