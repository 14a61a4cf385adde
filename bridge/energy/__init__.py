"""Interval energy: clock-aligned intervals from the meters' counters (pure: ``intervals``,
``tariffs``, ``virtual``), kept in SQLite (``store``), fed by the image (``recorder``)."""
