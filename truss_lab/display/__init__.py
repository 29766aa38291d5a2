"""Drawing truss_lab's values, for every front end: plain text (text.py), HTML (render.py, media.py),
the lock timeline (plots.py) and side-by-side runs (compare.py). Heavy libraries (matplotlib, PIL)
are imported only when a picture is drawn.
"""
