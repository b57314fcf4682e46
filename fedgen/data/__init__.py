"""Site data: validate and load a site folder (site.py) and generate the demo consortium (demo.py)."""
