"""gintrain runner: gin + absl wiring of lib/ into experiments."""
