"""The Jupyter front end: the `%truss` magics (magics.py) and the ipywidgets panel (widgets.py)."""
