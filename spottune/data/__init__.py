"""Data sources (materialised as ImageFolder trees), transforms and loaders."""
