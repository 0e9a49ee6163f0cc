"""Injected field bugs (variants.py) and the catalogue of checks that catch them (catalogue.py): test-only code,
the one package that reaches into others; no production path imports it."""
