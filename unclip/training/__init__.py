"""LightningModules (one per stage), callbacks and optimisation builders. Imports Lightning."""
