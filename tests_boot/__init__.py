"""The boot test (a package, so that it may use the tests' stand-ins: tests/hub_server.py,
tests/oci_stand_in.py)."""
