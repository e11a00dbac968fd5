"""Optional integrations with other libraries. Nothing here is imported by `import s2g`: import the one you use,
e.g. `s2g.integrations.diffusers` (needs `pip install -e ".[diffusers]"`)."""
