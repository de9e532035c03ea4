"""Sweeps: a grid of simulations (policies x budgets x profiles x traces) run in parallel
into one resumable table (`d2moe sweep`), and its figures (`d2moe plot`)."""
