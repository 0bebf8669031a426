"""Helpers shared by the test suites: processes we start, free ports, a real Redis."""
