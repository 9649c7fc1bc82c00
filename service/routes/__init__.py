"""HTTP routes, one router per concern; :func:`service.app.create_app` wires them."""
