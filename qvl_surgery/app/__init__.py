"""The app: the ``qvl-surgery`` command line, ``run``'s pipeline, ``package``, the polygraphy plug-in
and the tiny test checkpoint. Imports everything below it; nothing imports it."""
