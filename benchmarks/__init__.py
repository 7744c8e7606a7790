"""Demo, benchmark harness and the helpers they share with the tests."""
