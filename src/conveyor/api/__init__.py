"""The HTTP API process (``conveyor api`` / ``python -m conveyor.api``).

:func:`conveyor.api.app.create_app` builds the ASGI application; :mod:`conveyor.api.server` is
the command. Importing this package is cheap: nothing heavy is imported here.
"""
